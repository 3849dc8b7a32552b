"""featurize/streamed.py used directly: StreamedFeaturizer's rows are the checkpoint's sparse JL
map applied to plain-autograd TracIn / ReTrac features, its norms the exact per-draw norms
(tests/diffusion_refs.reference_rows: one autograd.grad per sample and draw); ``streamable``
says which models and specs can take the path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from gradindex.errors import ModelError
from gradindex.featurize import streamed
from gradindex.featurize.streamed import StreamedFeaturizer, streamable
from gradindex.inputs.models import Checkpoint
from gradindex.spec import BuildSpec
from tests.conftest import scheduler, tiny_unet
from tests.diffusion_refs import reference_rows


@pytest.mark.parametrize("layer_bytes", [None, 1])
def test_streamed_rows_are_the_sjlt_map_of_loop_features(layer_bytes, monkeypatch):
    """layer_bytes=1: every layer folds its items one group of M draws at a time, as a layer
    too large for ``LAYER_BYTES`` does (group sums must not straddle two chunks)."""
    if layer_bytes is not None:
        monkeypatch.setattr(streamed, "LAYER_BYTES", layer_bytes)
    model, sched = tiny_unet(3), scheduler()
    spec = BuildSpec(proj_dim=64, timesteps=2, noise_draws=2, num_train_timesteps=1000)
    feat = StreamedFeaturizer(
        Checkpoint(model, sched, "memory:0", "fp"), spec, seed=11, max_items=3
    )
    x0 = torch.from_numpy(np.random.default_rng(0).random((3, 1, 8, 8), dtype=np.float32)) * 2 - 1
    got = feat.featurize(x0, spec.draws(x0.shape[1:]))
    a, r_unit, norms = reference_rows([model], sched, x0, [{}] * 3, spec, [1.0])
    proj = feat.projector.project(torch.from_numpy(a).float()).double().numpy()  # P a
    np.testing.assert_allclose(
        got.tracin.double().numpy(), proj, rtol=1e-4, atol=1e-5 * np.abs(proj).max()
    )
    pr = feat.projector.project(torch.from_numpy(r_unit).float()).double().numpy()
    rows = got.retrac.double().numpy()  # P r, whose direction is that of P r / ‖r‖
    unit = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    np.testing.assert_allclose(unit, pr / np.linalg.norm(pr, axis=1, keepdims=True), atol=1e-5)
    np.testing.assert_allclose(got.norms.double().numpy(), norms[:, 0], rtol=1e-4)


def test_streamable_needs_sjlt_hookable_layers_and_unshared_weights():
    model = tiny_unet(1)
    names = [n for n, _ in model.named_parameters()]
    assert streamable(model, names, BuildSpec(projection="sjlt"))
    assert not streamable(model, names, BuildSpec(projection="gaussian"))
    shared = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    shared[1].weight = shared[0].weight
    assert not streamable(shared, ["0.weight"], BuildSpec())
    with_bn = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    assert not streamable(with_bn, [n for n, _ in with_bn.named_parameters()], BuildSpec())
    with pytest.raises(ModelError, match="streamed featurize path needs projection='sjlt'"):
        StreamedFeaturizer(
            Checkpoint(model, scheduler(), "memory:0", "fp"),
            BuildSpec(projection="gaussian", num_train_timesteps=1000),
            seed=0,
        )


class _Twice(nn.Module):
    """A denoiser over 1x4x4 images that runs its one Linear twice per forward."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = x.flatten(1) + t[:, None].float() / 1000
        return self.lin(torch.tanh(self.lin(h))).view_as(x)


def test_a_module_run_twice_per_forward_is_refused_naming_the_full_path():
    """Its norm needs both calls' gradients summed first: one-line ModelError, not rows that
    hold each call's norm and projection apart."""
    spec = BuildSpec(proj_dim=8, timesteps=1, num_train_timesteps=1000)
    feat = StreamedFeaturizer(Checkpoint(_Twice(), scheduler(), "memory:0", "fp"), spec, seed=0)
    x0 = torch.zeros(2, 1, 4, 4)
    with pytest.raises(
        ModelError, match=r"^a Linear runs more than once per forward.*path 'full'$"
    ):
        feat.featurize(x0, spec.draws(x0.shape[1:]))
