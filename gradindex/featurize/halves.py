"""The stored rows' two independent halves: a fidelity estimate that featurizes nothing again.

A build whose exact full-space scores do not fit in memory estimates its fidelity from the
rows it stored (``gradindex.featurize.fidelity``): each checkpoint block of a row is a sketch
P_c g, and two disjoint parts of the map drawn from independent randomness are two
independent sketches of the same g. Their score agreement gives the full sketch's noise
(split-half reliability, see fidelity's docstring), at no gradient cost.

Where the halves lie in a block of d columns:

- ``sjlt`` (nnz ≥ 2): the first nnz // 2 count sketches against the rest (``SJLTProjector``'s
  output blocks); ``gaussian``: the first d // 2 columns against the rest.
- ``kronecker``: per factored layer (its d_out × d_in columns at ``LayerPlan.offset``, row
  major), half A is rows o < d_out // 2 and columns i < d_in // 2 of the layer's block,
  half B the rows and columns past those: they use disjoint rows of both Gaussian factors
  P_out and P_in, so they are independent (the off-diagonal blocks are used by neither). A
  layer with d_out = 1 or d_in = 1 does not split and is left out of both. The dense block
  (sparse JL over the unfactored parameters) splits as an sjlt map does, or is left out of
  both when its map has one count sketch.
- ``kronecker-sjlt``: its final sparse JL map's count sketches, as ``sjlt``. Both halves share
  the per-layer Kronecker factors below that map, so their agreement misses those factors'
  error: the estimate reads high by that much.

Each half's columns are rescaled so that it is an unbiased sketch on its own (a half keeps a
share of each factor's rows, and the layers and the dense block keep different shares): the
sum over layers then weighs every parameter as the full map does.

Holds ``Halves``, ``split_halves`` (from the embedder: its spec and, for kronecker, the
featurizer's ``plan``), ``half_scores`` and ``noise_from_halves``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from gradindex.featurize.embedding import Embedder
from gradindex.featurize.kronecker import KroneckerFeaturizer, KroneckerGradients
from gradindex.spec import METHODS, BuildSpec


@dataclass
class Halves:
    """Two independent sketches inside every checkpoint block of ``dim`` columns: column
    indices ``a`` / ``b`` and the factor each column is multiplied by (``scale_a`` /
    ``scale_b``); ``left_out``: the parts of the map in neither half, said in the record."""

    a: np.ndarray  # [d_A] int
    b: np.ndarray  # [d_B] int
    scale_a: np.ndarray  # [d_A] float64
    scale_b: np.ndarray  # [d_B] float64
    dim: int
    left_out: list[str]

    def record(self) -> dict[str, object]:
        """What the manifest says about the halves."""
        out: dict[str, object] = {"d_a": len(self.a), "d_b": len(self.b), "of": self.dim}
        if self.left_out:
            out["left_out"] = "; ".join(self.left_out)
        return out


def _sjlt_split(d: int, nnz: int) -> int:
    """Columns of the first nnz // 2 count sketches of an sjlt map (SJLTProjector's blocks)."""
    return sum(d // nnz + (j < d % nnz) for j in range(nnz // 2))


def _sketch_groups(d: int, d_a: int, share_a: float, offset: int = 0) -> tuple[list, list]:
    """(columns, scales) of both halves of a block whose first d_a columns are a sketch
    carrying ``share_a`` of the map's second moment, the rest 1 - share_a."""
    a = np.arange(offset, offset + d_a)
    b = np.arange(offset + d_a, offset + d)
    return [(a, 1.0 / math.sqrt(share_a))], [(b, 1.0 / math.sqrt(1.0 - share_a))]


def _flat_halves(spec: BuildSpec, d: int) -> tuple[list, list, list[str]] | None:
    """An sjlt or Gaussian map's halves (a checkpoint block is one map), or None."""
    if spec.projection in ("sjlt", "kronecker-sjlt") and spec.sjlt_nnz >= 2:
        nnz = spec.sjlt_nnz  # kronecker-sjlt: its final map's count sketches
        return (*_sketch_groups(d, _sjlt_split(d, nnz), (nnz // 2) / nnz), [])
    if spec.projection == "gaussian" and d >= 2:
        return (*_sketch_groups(d, d // 2, (d // 2) / d), [])
    return None


def _kronecker_halves(kron: KroneckerGradients, nnz: int) -> tuple[list, list, list[str]]:
    """Per factored layer the diagonal quarter blocks of its d_out × d_in columns; the dense
    block's count sketches split in two (nnz as KroneckerGradients gives its map)."""
    parts_a, parts_b, unsplit = [], [], []
    for plan in kron.plan:
        if plan.route != "kronecker":
            continue
        ho, hi = plan.d_out // 2, plan.d_in // 2
        if ho == 0 or hi == 0:
            unsplit.append(plan.name)
            continue
        grid = plan.offset + np.arange(plan.d_out)[:, None] * plan.d_in + np.arange(plan.d_in)
        full = plan.d_out * plan.d_in
        parts_a.append((grid[:ho, :hi].ravel(), math.sqrt(full / (ho * hi))))
        rest = (plan.d_out - ho) * (plan.d_in - hi)
        parts_b.append((grid[ho:, hi:].ravel(), math.sqrt(full / rest)))
    left_out = []
    if unsplit:
        left_out.append(f"{len(unsplit)} layer(s) with d_out or d_in = 1 ({', '.join(unsplit)})")
    d_dense = kron.out_dim - kron.kron_dim
    if d_dense:
        k = min(nnz, d_dense)
        if k >= 2:
            a, b = _sketch_groups(d_dense, _sjlt_split(d_dense, k), (k // 2) / k, kron.kron_dim)
            parts_a += a
            parts_b += b
        else:
            left_out.append(f"the dense block's {d_dense} column(s) (one count sketch)")
    return parts_a, parts_b, left_out


def split_halves(embedder: Embedder) -> Halves | None:
    """The two independent halves of each checkpoint block of the embedder's rows, or None
    where the map does not split (sjlt with nnz = 1, identity, a Kronecker map none of whose
    parts split)."""
    spec, d = embedder.spec, embedder.block_dim
    feat = embedder.featurizers[0]
    if isinstance(feat, KroneckerFeaturizer) and spec.projection == "kronecker":  # same plan
        # for every checkpoint
        parts = _kronecker_halves(feat.kron, spec.sjlt_nnz)
    else:
        parts = _flat_halves(spec, d)
    if parts is None or not parts[0]:
        return None
    groups_a, groups_b, left_out = parts

    def join(groups: list) -> tuple[np.ndarray, np.ndarray]:
        cols = np.concatenate([c for c, _ in groups])
        scale = np.concatenate([np.full(len(c), s) for c, s in groups])
        return cols, scale

    (a, scale_a), (b, scale_b) = join(groups_a), join(groups_b)
    return Halves(a, b, scale_a, scale_b, d, left_out)


def half_scores(
    embedder: Embedder,
    stored_rows: Callable[[str, np.ndarray], np.ndarray],
    rows: np.ndarray,
    halves: Halves,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """[S, S] scores of both methods from each half of every checkpoint block of the stored
    rows: two independent sketches (ReTrac blocks are P_c r_c times a positive number, so
    their halves' cosines are those of the halves of P_c r_c)."""
    d = embedder.block_dim
    parts: list[dict[str, np.ndarray]] = [{}, {}]
    for m in METHODS:
        x = stored_rows(m, rows).astype(np.float64)  # [S, C·d]
        for h, (cols, scale) in enumerate(((halves.a, halves.scale_a), (halves.b, halves.scale_b))):
            total = np.zeros((len(x), len(x)))
            for c, w in enumerate(embedder.weights):
                block = x[:, c * d : (c + 1) * d][:, cols] * scale  # [S, d_h]
                if m == "retrac":
                    block = w**0.5 * block / np.linalg.norm(block, axis=1, keepdims=True)
                total += block @ block.T  # TracIn blocks carry √w_c already
            parts[h][m] = total
    return parts[0], parts[1]


def noise_from_halves(rho: float, d: int, d_a: int, d_b: int) -> float:
    """q (the full sketch's relative score noise) from its halves' corr(A, B) = rho:
    (1 + q·d/d_A)(1 + q·d/d_B) = 1/rho², d the full block's columns, solved for q ≥ 0."""
    a, b = d / d_a, d / d_b
    c = 1.0 - 1.0 / max(rho, 1e-6) ** 2  # ≤ 0
    return (-(a + b) + math.sqrt((a + b) ** 2 - 4 * a * b * c)) / (2 * a * b)
