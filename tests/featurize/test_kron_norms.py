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
from gradindex.featurize.kron_norms import cheaper_norm, formed_norms


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
    conv = torch.nn.Conv2d(3, 5, 3, padding=1)
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(6, 3, 6, 6, generator=gen)
    delta = torch.randn(6, 5, 6, 6, generator=gen)
    grads = []
    for i in range(6):
        w = conv.weight.detach().clone().requires_grad_()
        out = F.conv2d(a[i : i + 1], w, None, 1, 1)
        grads.append(torch.autograd.grad((out * delta[i : i + 1]).sum(), w)[0].flatten())
    g = torch.stack(grads).double()  # [6, 135]
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
