"""Summing per-item gradient blocks into TracIn / ReTrac features, and norms over blocks.

Holds ``accumulate`` (both features of a gradient call in one pass, one batched matmul per
column block) and ``norm_over_blocks`` (the Euclidean norm of blocks laid side by side), used
by ``gradients.GradientFeaturizer.featurize``.
"""

from __future__ import annotations

import torch

from gradindex.featurize.scratch import scratch


def norm_over_blocks(blocks: list[torch.Tensor]) -> torch.Tensor:
    """Euclidean norm over the last dimension of the blocks laid side by side: [..., n_j] → [...]."""
    sq = torch.linalg.vector_norm(blocks[0], dim=-1).square_()
    for g in blocks[1:]:
        sq += torch.linalg.vector_norm(g, dim=-1).square_()
    return sq.sqrt_()


def accumulate(
    acc: torch.Tensor,
    blocks: list[tuple[int, torch.Tensor]],
    coef: torch.Tensor,
    first: bool,
) -> None:
    """acc[:, :, a : a + n] (+)= Σ_m coef @ g[:, :, m] for each (a, g [k, B, M, n]) column block,
    coef [B, 2, k]: TracIn and ReTrac rows in one pass. ``first``: the first write (no zero
    fill, no read-back)."""
    B = acc.shape[0]
    for a, g in blocks:
        # into a contiguous [B, 2, n] first: torch runs a batched matmul whose output
        # has acc's batch stride item by item, slower than the copy
        part = scratch.get("aggregate", (B, 2, g.shape[-1]), acc.device)
        for m in range(g.shape[2]):
            g_m = g[:, :, m].permute(1, 0, 2)  # [B, k, n]
            if m == 0:
                torch.bmm(coef, g_m, out=part)
            else:
                part.baddbmm_(coef, g_m)
        dst = acc[:, :, a : a + g.shape[-1]]  # [B, 2, n]
        if first:
            dst.copy_(part)
        else:
            dst += part
