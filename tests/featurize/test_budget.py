"""The automatic memory budget: a preference (AUTO_WORK_BYTES of per-item work on a CPU) that
gives way when one sample needs more, a one-line error that names the machine (not a
--max-memory nobody set) when even 70% of the available memory cannot hold one, and on a
CUDA device the device's own memory, without the CPU's per-item cap."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import gradindex as gi
import gradindex.featurize.budget as budget
import gradindex.featurize.embedding as embedding
from gradindex.cli.main import main
from gradindex.errors import MemoryBudgetError
from gradindex.featurize.embedding import Embedder
from gradindex.inputs.models import load_checkpoints
from gradindex.store.layout import MANIFEST
from tests.conftest import scheduler, tiny_unet
from tests.diffusion_refs import reference_rows


def _spec(**kw) -> gi.BuildSpec:
    return gi.BuildSpec(proj_dim=64, projection="identity", timesteps=2, noise_draws=2,
                        batch_size=3, num_train_timesteps=1000, **kw)  # fmt: skip


def test_one_sample_over_the_preferred_work_still_builds_with_the_loops_rows(monkeypatch):
    """Per-item work capped far below one sample (AUTO_WORK_BYTES = 1 KiB, as a 35.7M model
    on the full path is against 768 MiB) with plenty available: featurizing takes what one
    sample needs and the rows are the plain loop's full-space rows (it was refused before:
    'max_memory=… cannot hold one sample', a budget the user never gave)."""
    monkeypatch.setattr(budget, "AUTO_WORK_BYTES", 1024)
    monkeypatch.setattr(budget, "available_memory", lambda: 16 << 30)
    model = tiny_unet(1)
    ckpts = load_checkpoints([(model, scheduler())], None, None, "none")
    spec = _spec()
    emb = Embedder(ckpts, spec, path="full")
    assert emb.featurizers[0].memory_left < 0  # not one item within the preferred work
    x0 = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(3)) * 2 - 1
    got = emb.embed(x0)
    assert emb.featurizers[0]._fitted_items >= spec.noise_draws
    T, U, N = reference_rows([model], scheduler(), x0, [{}] * 3, spec, [1.0])
    want_r = U / np.linalg.norm(U, axis=1, keepdims=True)
    np.testing.assert_allclose(got.tracin, T, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got.retrac, want_r, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got.norms, N, rtol=1e-4)


def test_an_explicit_budget_stays_a_limit(monkeypatch):
    """--max-memory is the user's word: no spare is taken beyond it."""
    monkeypatch.setattr(budget, "available_memory", lambda: 16 << 30)
    ckpts = load_checkpoints([(tiny_unet(1), scheduler())], None, None, "none")
    emb = Embedder(ckpts, _spec(), path="full", max_memory=1 << 20)
    assert emb.featurizers[0].memory_spare is None
    x0 = torch.zeros(3, 1, 8, 8)
    with pytest.raises(MemoryBudgetError, match=r"^max_memory=1M cannot hold one sample"):
        emb.embed(x0)


def test_a_machine_without_room_for_one_sample_says_so_in_one_line(
    tmp_path, monkeypatch, saved_checkpoints
):
    """Nothing left to take: the error names the machine's memory and what one sample needs,
    and does not tell the user to raise a --max-memory they never set; nothing is written."""
    monkeypatch.setattr(budget, "AUTO_WORK_BYTES", 1024)
    monkeypatch.setattr(budget, "available_memory", lambda: 1024)  # 70% of it under the cap
    imgs = np.random.default_rng(0).random((4, 1, 8, 8), dtype=np.float32)
    np.save(tmp_path / "x.npy", imgs)
    args = ["build", "-c", str(saved_checkpoints[0]), "--data", str(tmp_path / "x.npy"), "--out",
            str(tmp_path / "o"), "--proj-dim", "32", "--timesteps", "2"]  # fmt: skip
    res = CliRunner().invoke(main, args)
    errors = [line for line in res.output.splitlines() if "Error" in line]
    assert res.exit_code == 1 and len(errors) == 1, res.output
    assert errors[0].startswith("Error: this machine cannot hold one sample: featurizing needs")
    assert "max-memory" not in errors[0] and "Traceback" not in res.output
    assert not (tmp_path / "o" / MANIFEST).exists()


def test_on_a_gpu_the_budget_is_the_devices_free_memory_without_the_cpu_cap(monkeypatch):
    """device_memory reports (allocated, free) of a CUDA device; the budget is allocated plus
    70% of free, all of it for per-item work (the CPU's 768 MiB cap would hold a GPU to a few
    items per call), and the host's memory does not enter."""
    assert budget.device_memory(torch.device("cpu")) is None
    assert budget.budget_bytes(None, 1 << 30, gpu_free=10 << 30) == (1 << 30) + 7 * (1 << 30)
    assert budget.budget_bytes(None, gpu_free=10 << 30) == 7 * (1 << 30)
    assert budget.budget_bytes(123, 1 << 30, gpu_free=10 << 30) == 123  # an explicit budget
    monkeypatch.setattr(budget, "available_memory", lambda: 1 << 30)  # the host: small
    monkeypatch.setattr(embedding, "device_memory", lambda device: (2 << 30, 40 << 30))
    ckpts = load_checkpoints([(tiny_unet(1), scheduler())], None, None, "none")
    emb = Embedder(ckpts, _spec(), path="full")
    feat = emb.featurizers[0]
    buffers = 8 * feat.num_params * 3
    assert feat.memory_left == int(0.7 * (40 << 30)) - buffers and feat.memory_spare == 0
    assert feat.budget == (2 << 30) + int(0.7 * (40 << 30))
