"""The Kronecker layouts' factor shapes, identity factors, final sparse JL map and factor dtypes,
against numbers worked out by hand (gradindex.featurize.kronecker): a changed shape or map changes
every row of an index, and queries of an existing index would disagree with its rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradindex as gi
from gradindex.featurize.kronecker import (
    KroneckerFeaturizer,
    KroneckerGradients,
    _KronCall,
    _project_layer,
)
from gradindex.featurize.losses import item_losses
from gradindex.inputs.models import load_checkpoints
from tests.conftest import scheduler, tiny_unet


def _loss(out, target):
    return item_losses(out, target, "mse")


def _hand_model() -> nn.Module:
    """Layers whose [c_out, a_dim] shapes hit each case of the factor-shape rule."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(8, 64, 3),  # [64, 72]: 4,608 weights
        nn.Linear(300, 10),  # [10, 300]: the output side kept whole
        nn.Linear(10, 200),  # [200, 10]: the input side kept whole
        nn.Linear(32, 32),  # 1,024 weights: at most LAYER_DIM, kept whole (dense)
        nn.Linear(33, 32),  # 1,056 weights: factored
    )


def _kron(model: nn.Module, out_dim: int, **kwargs) -> KroneckerGradients:
    names = [n for n, _ in model.named_parameters()]
    return KroneckerGradients(model, names, _loss, out_dim=out_dim, seed=3, **kwargs)


def _factors(kron: KroneckerGradients, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(P_out [d_out, c_out], P_in [d_in, a_dim]) of the layer holding ``name``."""
    layer = kron._layers[kron.model.get_submodule(name.rsplit(".", 1)[0])]
    plan = layer["plan"]
    return layer["p_out"], layer["p_in"].reshape(plan.d_in, -1)


def test_kronecker_sjlt_factor_shapes_balance_the_two_projections_by_hand():
    """1,024 outputs per layer, d_out ≈ √(1024·a_dim / c_out) capped at c_out, d_in = 1024 //
    d_out capped at a_dim; a side kept whole is the identity; 1,024 weights or fewer: dense."""
    kron = _kron(_hand_model(), 256, layer_dim=1024)
    shapes = {p.name: (p.route, p.d_out, p.d_in) for p in kron.plan}
    assert shapes == {
        "0.weight": ("kronecker", 34, 30),  # √(1024·72/64) = 33.9 -> 34; 1024 // 34 = 30
        "1.weight": ("kronecker", 10, 102),  # √(1024·300/10) = 175 -> c_out 10; 1024 // 10
        "2.weight": ("kronecker", 7, 10),  # √(1024·10/200) = 7.2 -> 7; 146 -> a_dim 10
        "4.weight": ("kronecker", 32, 32),  # √(1024·33/32) = 32.5 -> 32; 1024 // 32 = 32
        "3.weight": ("dense", 0, 0),
        **{f"{i}.bias": ("dense", 0, 0) for i in range(5)},
    }
    # the rows before the final map: each layer's d_out·d_in, then every dense parameter whole
    dense = 64 + 10 + 200 + 32 + 32 + 32 * 32  # biases and the 32x32 weight
    assert kron.inner_dim == 34 * 30 + 10 * 102 + 7 * 10 + 32 * 32 + dense
    p_out, p_in = _factors(kron, "1.weight")
    assert torch.equal(p_out, torch.eye(10)) and p_in.shape == (102, 300)
    p_out, p_in = _factors(kron, "2.weight")
    assert torch.equal(p_in, torch.eye(10)) and p_out.shape == (7, 200)
    p_out, p_in = _factors(kron, "4.weight")
    assert torch.equal(p_out, torch.eye(32)) and not torch.equal(p_in[:, :32], torch.eye(32))
    p_out, p_in = _factors(kron, "0.weight")
    assert p_out.shape == (34, 64) and p_in.shape == (30, 72)


def test_kronecker_layout_keeps_its_square_gaussian_factors():
    """'kronecker' (d split over the layers) as its indexes were built: out_dim 1,050, biases
    dense with int(1050 / 8) = 131 columns, (1050 - 131) // 5 = 183 per layer, d_out = ⌊√183⌋
    = 13 (not round(13.5) = 14) capped at c_out, d_in = 183 // d_out capped at a_dim; no
    factor is the identity, even one keeping its whole side."""
    kron = _kron(_hand_model(), 1050)
    shapes = {p.name: (p.d_out, p.d_in) for p in kron.plan if p.route == "kronecker"}
    assert shapes == {
        "0.weight": (13, 14),
        "1.weight": (10, 18),
        "2.weight": (13, 10),
        "3.weight": (13, 14),
        "4.weight": (13, 14),
    }
    assert not torch.equal(_factors(kron, "1.weight")[0], torch.eye(10))
    assert not torch.equal(_factors(kron, "2.weight")[1], torch.eye(10))


def test_kronecker_sjlt_final_map_has_one_nonzero_in_each_count_sketch():
    """The final map S is an sjlt of nnz count sketches (what the fidelity halves split): every
    input column of S has exactly one ±1/√nnz in each of the nnz output blocks, of sizes
    63, 63, 62, 62 for 250 outputs and nnz = 4."""
    kron = _kron(_hand_model(), 250, nnz=4, layer_dim=1024)
    s = kron._final.project(torch.eye(kron.inner_dim)).numpy()  # [U, 250]: row i is S e_i
    edges = np.cumsum([0, 63, 63, 62, 62])
    for lo, hi in zip(edges[:-1], edges[1:]):
        block = s[:, lo:hi]
        assert ((block != 0).sum(1) == 1).all()
        np.testing.assert_allclose(np.abs(block[block != 0]), 0.5, rtol=1e-6)


def test_a_kronecker_sjlt_featurizer_gives_each_layer_1024_outputs():
    """Through the build's own featurizer: the tiny UNet's [16, 8·3·3] conv gets d_out = 16
    (√(1024·72/16) = 67.9, capped), d_in = 1024 // 16 = 64; its [8, 24·3·3] conv d_out = 8,
    d_in = 128; the [8, 1·3·3] input conv (72 weights) is kept whole."""
    ckpt = load_checkpoints([(tiny_unet(0), scheduler())])[0]
    spec = gi.BuildSpec(projection="kronecker-sjlt", norms="projected", proj_dim=256)
    plan = {p.name: p for p in KroneckerFeaturizer(ckpt, spec, seed=0).kron.plan}
    conv = plan["down_blocks.1.resnets.0.conv1.weight"]
    assert (conv.d_out, conv.d_in) == (16, 64)
    conv = plan["up_blocks.1.resnets.0.conv1.weight"]
    assert (conv.d_out, conv.d_in) == (8, 128)
    assert plan["conv_in.weight"].route == "dense"


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_bfloat16_factors_are_projected_in_bfloat16_and_summed_in_float32(kind):
    """A layer that ran in bfloat16: its inputs and output gradients are projected by the
    factors rounded to bfloat16 (a bfloat16 product, as the layer's own matmuls), and the
    per-position outer products summed in float32: against those bfloat16 products summed in
    float64 here (an all-bfloat16 sum errs by ~1e-2)."""
    torch.manual_seed(0)
    module = nn.Linear(200, 100) if kind == "linear" else nn.Conv2d(16, 64, 3, padding=1)
    kron = _kron(nn.Sequential(module), 256, norms="projected", layer_dim=1024)
    layer = kron._layers[module]
    plan = layer["plan"]
    assert plan.d_out < plan.shape[0] and plan.d_in < int(np.prod(plan.shape[1:]))  # no identity
    gen = torch.Generator().manual_seed(2)
    a_shape, d_shape = (
        ((3, 5, 200), (3, 5, 100)) if kind == "linear" else ((3, 16, 6, 6), (3, 64, 6, 6))
    )
    a = torch.randn(a_shape, generator=gen).bfloat16()
    delta = torch.randn(d_shape, generator=gen).bfloat16()
    p_out, p_in = layer["p_out"].bfloat16(), layer["p_in"].bfloat16()
    if kind == "linear":
        a_proj = (a @ p_in.T).double()  # [I, L, d_in]
        d_proj = (delta @ p_out.T).double()  # [I, L, d_out]
    else:
        a_proj = F.conv2d(a, p_in, None, 1, 1).double().flatten(2).transpose(1, 2)
        d_proj = (p_out @ delta.flatten(2)).double().transpose(1, 2)
    want = (d_proj.transpose(1, 2) @ a_proj).flatten(1)  # [I, d_out·d_in]
    state = _KronCall(torch.zeros(3, kron.inner_dim), torch.zeros(3), torch.zeros(3), 1)
    _project_layer(module, layer, a, delta, state)
    got = state.rows[:, plan.offset : plan.offset + plan.d_out * plan.d_in]
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))
