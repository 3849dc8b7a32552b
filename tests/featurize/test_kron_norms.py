"""Exact Kronecker-layer norms (gradindex.featurize.kron_norms): the ghost / formed choice by
FLOPs worked out by hand, and formed norms in chunks of whole groups within their byte cap,
against per-item weight gradients from autograd."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import gradindex.featurize.kron_norms as kron_norms
from gradindex.featurize.kron_norms import cheaper_norm, formed_norms, ghost_norms


def _conv_case(items: int, seed: int):
    """A 3→5 3×3 conv, inputs a and output gradients δ of ``items`` items on 6×6 maps, and
    each item's weight gradient from autograd ([items, 135] float64), one item at a time."""
    conv = torch.nn.Conv2d(3, 5, 3, padding=1)
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(items, 3, 6, 6, generator=gen)
    delta = torch.randn(items, 5, 6, 6, generator=gen)
    grads = []
    for i in range(items):
        w = conv.weight.detach().clone().requires_grad_()
        out = F.conv2d(a[i : i + 1], w, None, 1, 1)
        grads.append(torch.autograd.grad((out * delta[i : i + 1]).sum(), w)[0].flatten())
    return conv, a, delta, torch.stack(grads).double()


@pytest.mark.parametrize(
    ("positions", "a_dim", "c_out", "want"),
    [
        (4, 100, 100, "ghost"),  # 4·200 = 800 FLOPs against 2·10,000 formed
        (1024, 9, 8, "formed"),  # a 32x32 map of a small conv: 17,408 against 2·72
        (7, 10, 10, "ghost"),  # 7·20 = 140 < 2·100: ghost only because formed counts double
        (11, 10, 10, "formed"),  # 220 > 200
    ],
)
def test_the_cheaper_norm_weighs_formed_flops_twice(positions, a_dim, c_out, want):
    assert cheaper_norm(positions, a_dim, c_out) == want


@pytest.mark.parametrize(("group", "groups_per_chunk", "chunks"), [(2, 2, [4, 2]), (3, 1, [3, 3])])
def test_formed_norms_in_chunks_of_whole_groups_equal_brute_force(
    monkeypatch, group, groups_per_chunk, chunks
):
    """A byte cap of ``groups_per_chunk`` groups' float32 gradients ([group, 5, 27] each): the
    six items' gradients are formed in chunks of whole groups within it, and each chunk's
    squared norms land on its own items and groups."""
    conv, a, delta, g = _conv_case(6, seed=1)  # g: [6, 135]
    monkeypatch.setattr(kron_norms, "_FORMED_BYTES", groups_per_chunk * group * 5 * 27 * 4)
    sizes = []
    form = kron_norms.conv2d_item_weight_grads

    def counted(module, a, delta, out, *args):
        sizes.append(len(a))
        return form(module, a, delta, out, *args)

    monkeypatch.setattr(kron_norms, "conv2d_item_weight_grads", counted)
    s = SimpleNamespace(item_sq=torch.zeros(6), group_sq=torch.zeros(6 // group), group=group)
    formed_norms(conv, a, delta, None, delta.flatten(2).transpose(1, 2), s)
    assert sizes == chunks
    np.testing.assert_allclose(s.item_sq, g.pow(2).sum(1), rtol=1e-4)
    np.testing.assert_allclose(s.group_sq, g.view(-1, group, 135).sum(1).pow(2).sum(1), rtol=1e-4)


@pytest.mark.parametrize("group", [1, 2])
def test_exact_layer_norms_ghost_and_formed_equal_brute_force(group):
    """‖Σ_pos δ_pos a_posᵀ‖² per item and per group sum, by the ghost identity and by forming
    the gradient, against the per-item weight gradient of one conv from autograd."""
    conv, a, delta, g = _conv_case(4, seed=0)
    want_item = g.pow(2).sum(1)
    want_group = g.view(4 // group, group, -1).sum(1).pow(2).sum(1)
    patches_t = F.unfold(a, 3, padding=1).transpose(1, 2)
    d_t = delta.flatten(2).transpose(1, 2)
    for fill in (ghost_norms, formed_norms):
        s = SimpleNamespace(item_sq=torch.zeros(4), group_sq=torch.zeros(4 // group), group=group)
        if fill is ghost_norms:
            fill(patches_t, d_t, s)
        else:
            fill(conv, a, delta, None, d_t, s)
        np.testing.assert_allclose(s.item_sq, want_item, rtol=1e-4)
        np.testing.assert_allclose(s.group_sq, want_group, rtol=1e-4)
