"""Device resolution: what featurizing runs on when a device is asked for."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import gradindex as gi
from gradindex.errors import SpecError
from gradindex.inputs.devices import resolve_device
from tests.conftest import scheduler, tiny_unet


def test_cpu_and_auto() -> None:
    assert resolve_device("cpu") == "cpu"
    assert resolve_device(torch.device("cpu")) == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the fallback is for machines without CUDA")
def test_cuda_without_cuda_falls_back_and_says_so() -> None:
    with pytest.warns(RuntimeWarning, match="CUDA is not available here; featurizing on the CPU"):
        assert resolve_device("cuda:0") == "cpu"


@pytest.mark.parametrize("bad", ["tpu", "gpu", "cuda:x", ""])
def test_unknown_devices_are_one_line_errors(bad: str) -> None:
    with warnings.catch_warnings(), pytest.raises(SpecError) as err:
        warnings.simplefilter("ignore")
        resolve_device(bad)
    assert "\n" not in str(err.value) and "cpu, cuda" in str(err.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the fallback is for machines without CUDA")
def test_build_asked_for_cuda_runs_on_cpu_with_the_same_rows(tmp_path, images) -> None:
    """A build and an index asked to run on CUDA where there is none: one warning each, and the
    rows equal a CPU build's (the fallback is the CPU path, not something else)."""
    spec = gi.BuildSpec(timesteps=2, proj_dim=16, batch_size=4)
    ckpt = [(tiny_unet(1), scheduler())]
    cpu = gi.build_index(checkpoints=ckpt, data=images, out=tmp_path / "cpu", spec=spec)
    with pytest.warns(RuntimeWarning, match="featurizing on the CPU"):
        asked = gi.build_index(
            checkpoints=ckpt, data=images, out=tmp_path / "cuda", spec=spec, device="cuda"
        )
    assert asked.device == "cpu"
    for method in ("tracin", "retrac"):
        # allclose: the first build in a process can differ in the last bits (README)
        np.testing.assert_allclose(asked.vectors(method), cpu.vectors(method), rtol=1e-5, atol=1e-6)
