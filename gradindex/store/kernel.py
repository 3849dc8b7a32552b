"""The kernel methods' factors (``kernel.h5``) and the query transform they give.

Checkpoint c's block of a stored TracIn row (columns c·d:(c+1)·d) is √w_c φ_c(z), where
φ_c = P_c · mean gradient is TRAK's feature; its block of a ReTrac row is √w_c ρ_c(z), ρ_c the
unit-normalised projected mean of the unit per-timestep gradients. With the Gram
G_c = Σ_z φ_c(z) φ_c(z)ᵀ over the unflagged rows, a kernel score is an inner product with the
rows already indexed:

    Σ_c w_c φ_c(q)ᵀ (G_c + λ_c I)⁻¹ φ_c(z) = ⟨q', x(z)⟩,   q'_c = (G_c + λ_c I)⁻¹ q_c

with q_c the query's block (√w_c φ_c(q)) and x(z) the stored row: ``trak`` searches the
TracIn index with a transformed TracIn query (TRAK; D-TRAK on a ``loss="square"`` index) and
``retrak`` the ReTrac index with a transformed ReTrac query. G_c has rank ≤ min(N, d), so
``kernel.h5`` keeps eigen factors, never G_c (:mod:`gradindex.store.kernel_factors`), in one of
two forms per row set, chosen by size:

- N ≥ d, the primal: ``basis`` [C, d, r] float32 (U_c), served by :class:`Kernel` as above;
- N < d, the dual: ``dual_basis`` [C, N, r] float32 (V_c, eigenvectors of the N × N Gram
  K_c = Φ_c Φ_cᵀ), smaller and cheaper at the same r, served by
  :class:`gradindex.store.kernel_dual.DualKernel`, which scores every row itself; with
  ``dual_lead`` [C, N, k] float64, its leading columns again at full precision (files
  without it are served from the float32 columns).

Either with ``eigenvalues`` [C, r] and ``tail`` [C] (``_retrac`` suffixed for the ReTrac rows),
attrs ``lambda``, ``lambda_retrac``, ``rows``, ``build_id``, ``format`` (3), readable with
plain h5py. Exact (r = rank) where the factors fit the bounds of ``kernel_factors``, else the
top r and the left-out mean. Default λ_c = LAMBDA_SCALE · (trace(G_c) − top eigenvalue) / d,
the scale chosen once on held-out calibration digits of ``benchmarks/bench_lds.py`` (never on
its LDS targets); any λ > 0 keeps N < d well-posed. Older files are still served
(:mod:`gradindex.store.kernel_load`): format 2 (primal factors only) as they are, format 1
(dense ``gram`` [C, d, d]) by Cholesky; ``gradindex kernel DIR`` rewrites either.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from scipy.sparse.linalg import eigsh

from gradindex.errors import IndexStateError, SearchError
from gradindex.store.kernel_factors import (
    EIGH_MAX,
    LAMBDA_SCALE,
    Factors,
    dual_bounds,
    dual_columns,
    lambda_rule,
    lead_columns,
    rank_bounds,
    row_set_factors,
    share_columns,
)
from gradindex.store.layout import (
    KERNEL,
    VECTORS,
)
from gradindex.store.vectors import VectorStore

KERNEL_METHODS = {"trak": "tracin", "retrak": "retrac"}
"""Search method served by a kernel → the stored rows (and Gram) it uses."""
SUFFIX = {"tracin": "", "retrac": "_retrac"}
"""Row set → the suffix of its datasets in kernel.h5 (``basis``, ``basis_retrac``, ...)."""
FORMAT = 3
"""kernel.h5 format: 1 held dense Grams (``gram`` [C, d, d]), 2 their primal eigen factors,
3 primal or dual factors per row set (``basis`` or ``dual_basis``)."""
MAX_KERNEL_DIM = 8192
"""Largest d with a kernel (an ``identity`` projection's d is the parameter count, whose
eigenbasis would not be computed in any reasonable time)."""
LAMBDA_RULE = f"lambda_c = {LAMBDA_SCALE} * (trace(G_c) - top eigenvalue) / d"


def top_eigenvalue(g: np.ndarray) -> float:
    """The largest eigenvalue of a symmetric PSD matrix (Lanczos above d = 256, from a fixed
    start vector: the recorded λ is reproducible)."""
    if len(g) <= 256:
        return float(np.linalg.eigvalsh(g)[-1])
    v0 = np.ones(len(g))
    return float(eigsh(g, k=1, which="LA", v0=v0, return_eigenvectors=False)[0])


def default_lambdas(gram: np.ndarray) -> list[float]:
    """The λ rule from dense Grams [C, d, d] (a format-1 kernel.h5)."""
    d = gram.shape[-1]
    return [lambda_rule(float(np.trace(g)), top_eigenvalue(g), d) for g in gram]


def too_wide(d: int) -> str | None:
    """Why an index with d columns per checkpoint gets no kernel, or None when it gets one."""
    if d <= MAX_KERNEL_DIM:
        return None
    return (
        f"d = {d} per checkpoint > {MAX_KERNEL_DIM}: its Gram's eigenbasis would take too "
        f"long; build with a projection (proj_dim <= {MAX_KERNEL_DIM}) for method 'trak'"
    )


def write_kernel(
    folder: Path, weights: Sequence[float], build_id: str | None, exact: bool = False
) -> dict[str, Any]:
    """Compute the kernel factors of ``folder``'s vectors.h5 (both row sets, from the rows),
    write ``kernel.h5`` and return the manifest's ``kernel`` record ({"skipped": why} and no
    file when d is too wide). The dual form where fewer rows than d are kept, else the primal;
    eigenpairs kept per checkpoint as ``kernel_factors.share_columns`` (the dual: one byte
    budget for both row sets) / ``rank_bounds`` (the primal) say (exact whenever the rank fits), or with ``exact`` all of them (kernel.h5 then up to the
    rows' own size, and each primal query's transform up to two scans of them)."""
    num_ckpts = len(weights)
    with VectorStore.open(folder / VECTORS) as store:
        d = store.dim // num_ckpts
        why = too_wide(d)
        if why is not None:
            (folder / KERNEL).unlink(missing_ok=True)
            return {"skipped": why}
        if store.dim % num_ckpts:
            raise IndexStateError(
                f"{store.path}: row width {store.dim} is not a multiple of {num_ckpts} checkpoints"
            )
        keep = np.flatnonzero(~store.flagged)
        rank = max(1, min(len(keep), d))
        dual = 0 < len(keep) < d
        shared = dual and not exact and len(keep) <= EIGH_MAX
        if exact or shared:
            bounds = (rank, rank)
        else:
            bounds = (
                dual_bounds(len(keep), num_ckpts) if dual else rank_bounds(len(keep), d, num_ckpts)
            )
        factors = {
            rows: row_set_factors(store.file[rows], keep, weights, d, bounds, dual)
            for rows in SUFFIX
        }
    if shared:
        columns = dual_columns(len(keep), num_ckpts) - lead_columns(factors)
        factors = share_columns(factors, max(2, columns), d)
    return _write(folder, factors, len(keep), d, build_id)


def merge_kernels(folder: Path, weights: Sequence[float], build_id: str | None) -> dict[str, Any]:
    """The kernel of rows assembled from index folders (a merge, an add): eigen factors do not
    add up over parts the way Grams did, so one pass over the assembled rows."""
    return write_kernel(folder, weights, build_id)


def lambda_key(rows: str) -> str:
    """The manifest's / kernel.h5's key of a row set's default λ list."""
    return "lambda" if rows == "tracin" else f"lambda_{rows}"


def _write(
    folder: Path, factors: dict[str, Factors], rows: int, d: int, build_id: str | None
) -> dict[str, Any]:
    """Write ``kernel.h5`` atomically (temporary file, then rename); the manifest record."""
    lambdas = {
        r: [lambda_rule(t, top, d) for t, top in zip(f.trace, f.top, strict=True)]
        for r, f in factors.items()
    }
    tmp = folder / f".{KERNEL}.tmp"
    try:
        with h5py.File(tmp, "w") as f:
            for r, fac in factors.items():
                name = "dual_basis" if fac.dual else "basis"
                f.create_dataset(f"{name}{SUFFIX[r]}", data=fac.basis)
                f.create_dataset(f"eigenvalues{SUFFIX[r]}", data=fac.eigenvalues)
                f.create_dataset(f"tail{SUFFIX[r]}", data=fac.tail)
                if fac.lead is not None:
                    f.create_dataset(f"dual_lead{SUFFIX[r]}", data=fac.lead)
                f.attrs[lambda_key(r)] = np.asarray(lambdas[r])
            f.attrs["rows"] = rows
            f.attrs["build_id"] = build_id or ""
            f.attrs["format"] = FORMAT
        os.replace(tmp, folder / KERNEL)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    record: dict[str, Any] = {"rows": rows, "rule": LAMBDA_RULE, "format": FORMAT}
    record.update({lambda_key(r): lam for r, lam in lambdas.items()})
    record["rank"] = {r: int(f.basis.shape[-1]) for r, f in factors.items()}
    record["exact"] = {r: f.exact for r, f in factors.items()}
    record["form"] = {r: "dual" if f.dual else "primal" for r, f in factors.items()}
    return {**record, "proj_dim": d}


def check_lambdas(lam: float | Sequence[float], num_ckpts: int) -> list[float]:
    """One λ for every checkpoint, or one per checkpoint; each finite and > 0."""
    values = [lam] * num_ckpts if np.ndim(lam) == 0 else list(lam)  # type: ignore[list-item]
    if len(values) != num_ckpts:
        raise SearchError(
            f"lambda has {len(values)} values for {num_ckpts} checkpoints; give one or one each"
        )
    try:
        out = [float(v) for v in values]
    except (TypeError, ValueError):
        raise SearchError(f"lambda={lam!r}: must be a number > 0") from None
    if not all(math.isfinite(v) and v > 0 for v in out):
        raise SearchError(f"lambda={lam!r}: must be finite and > 0 (ridge of G_c + lambda I)")
    return out


class Kernel:
    """One row set's kernel factors; ``transform`` turns query rows of that set into the rows
    whose inner product with the stored rows is the kernel score (TracIn rows: TRAK; ReTrac
    rows: 'retrak'), for the default λ or any other without refactoring."""

    def __init__(
        self,
        basis: np.ndarray,  # U [C, d, r] float32
        eigenvalues: np.ndarray,  # Λ [C, r], zero padded
        tail: np.ndarray,  # μ [C]: mean eigenvalue left out (0: exact)
        lambdas: Sequence[float],
    ):
        self.basis = np.ascontiguousarray(basis, dtype=np.float32)
        self.eigenvalues = np.asarray(eigenvalues, dtype=np.float64)
        self.tail = np.asarray(tail, dtype=np.float64)
        self.lambdas = check_lambdas(list(lambdas), len(self.basis))

    def transform(self, queries: np.ndarray, lam: Any = None) -> np.ndarray:
        """Query rows [B, C·d] → q' [B, C·d] float32 whose inner product with every stored row
        is the kernel score. Exact factors (μ_c = 0: U_c spans the rows) give the span part
        of (G_c + λ_c I)⁻¹ q_c, U_c diag(1/(Λ_c + λ)) U_cᵀ q_c: the rest of q_c is orthogonal
        to every stored row, and leaving it out avoids float32 cancellation against q_c / λ.
        Truncated factors give q_c / (λ + μ_c) + U_c diag(1/(Λ_c + λ) − 1/(λ + μ_c)) U_cᵀ q_c."""
        num_ckpts, d = self.basis.shape[:2]
        lambdas = self.lambdas if lam is None else check_lambdas(lam, num_ckpts)
        q = np.asarray(queries, dtype=np.float32).reshape(len(queries), num_ckpts, d)
        out = np.empty(q.shape, dtype=np.float32)
        for c in range(num_ckpts):
            coef = 1.0 / (self.eigenvalues[c] + lambdas[c])
            if self.tail[c] > 0:
                coef = coef - 1.0 / (lambdas[c] + self.tail[c])
            inner = (q[:, c] @ self.basis[c]) * coef.astype(np.float32)
            out[:, c] = inner @ self.basis[c].T
            if self.tail[c] > 0:
                out[:, c] += q[:, c] * np.float32(1.0 / (lambdas[c] + self.tail[c]))
        return out.reshape(len(queries), num_ckpts * d)
