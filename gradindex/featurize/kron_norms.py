"""Exact full-space squared norms of one Kronecker-factored layer's per-item gradients, for
``gradindex.featurize.kronecker`` (``norms='exact'``), whichever way is cheaper per layer:

- ghost: ‖G_i‖² = Σ_{pos,pos'} (a_pos·a_pos')(δ_pos·δ_pos'), costing L²·(in·kh·kw + out) for L
  positions — cheap for small maps (late UNet blocks, attention projections over few tokens);
- formed: G_i built one layer at a time (a few items at a time, then dropped), costing
  L·in·kh·kw·out — cheaper for large maps.

The norm of a mean over M noise draws uses the same identity over the M·L positions of the
draws (or the sum of the formed gradients)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from gradindex.featurize.layer_grads import conv2d_item_weight_grads

_FORMED_BYTES = 64 * 2**20  # cap on one layer's formed per-item gradients held at once
# a formed norm's cost per FLOP against the ghost identity's (batched Gram matmuls): measured
# at one thread, 1.5-2 made the per-layer choice the fastest of the two on every layer of the
# 35.7M CIFAR-10 DDPM UNet (norms 1.19 instead of 1.40 CPU-s per 8 items) and the demo UNet
FORMED_COST = 2.0


def cheaper_norm(positions: int, a_dim: int, c_out: int) -> str:
    """'ghost' or 'formed' for a layer of ``positions`` (per group of draws), input patch size
    ``a_dim`` and ``c_out`` outputs: the one with fewer (weighted) FLOPs per item."""
    ghost = positions * (a_dim + c_out) < FORMED_COST * a_dim * c_out
    return "ghost" if ghost else "formed"


def ghost_norms(patches_t: Tensor, d_t: Tensor, s: Any) -> None:
    """‖Σ_pos δ_pos a_posᵀ‖² = Σ_{pos,pos'} (a_pos·a_pos')(δ_pos·δ_pos'), per item and over each
    group's concatenated positions (the norm of the group's gradient sum)."""
    n, positions = d_t.shape[:2]
    groups = n // s.group
    a_g = patches_t.reshape(groups, s.group * positions, -1)  # [G, M·L, a]
    d_g = d_t.reshape(groups, s.group * positions, -1)  # [G, M·L, out]
    prod = torch.bmm(a_g, a_g.transpose(1, 2)).mul_(torch.bmm(d_g, d_g.transpose(1, 2)))
    total = prod.sum((1, 2))  # [G]
    s.group_sq += total
    if s.group == 1:
        s.item_sq += total
        return
    blocks = prod.view(groups, s.group, positions, s.group, positions)
    diag = torch.diagonal(blocks, dim1=1, dim2=3)  # [G, L, L, M]
    s.item_sq += diag.sum((1, 2)).reshape(n)


def formed_norms(
    module: nn.Module, a: Tensor, delta: Tensor, patches_t: Tensor | None, d_t: Tensor, s: Any
) -> None:
    """Squared norms from this layer's per-item gradients, formed a few groups at a time."""
    n = a.shape[0]
    c_out = d_t.shape[2]
    a_dim = module.weight[0].numel()
    per_group = s.group * c_out * a_dim * 4
    step = max(1, _FORMED_BYTES // per_group) * s.group  # items per chunk, whole groups
    for start in range(0, n, step):
        stop = min(n, start + step)
        if isinstance(module, nn.Linear):
            g = torch.bmm(d_t[start:stop].transpose(1, 2), patches_t[start:stop])  # [i, out, in]
        else:
            g = torch.empty(stop - start, c_out, a_dim, device=a.device)
            conv2d_item_weight_grads(module, a[start:stop], delta[start:stop], g, True)
        sq = g.pow(2).sum((1, 2))
        s.item_sq[start:stop] += sq
        if s.group > 1:
            sq = g.view(-1, s.group, c_out, a_dim).sum(1).pow(2).sum((1, 2))
        s.group_sq[start // s.group : stop // s.group] += sq
