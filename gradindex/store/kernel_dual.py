"""The dual form of a kernel method: row sets with fewer rows than columns per checkpoint.

With X_c the stored rows' checkpoint-c block (N × d, each row √w_c φ_c(z)), q_c the query's block
and K_c = Φ_c Φ_cᵀ = X_c X_cᵀ / w_c the N × N Gram of the features (the primal G_c = Φ_cᵀ Φ_c has
the same non-zero eigenvalues), the push-through identity gives every row's score at once:

    scores_c = X_c (G_c + λ_c I)⁻¹ q_c = (K_c + λ_c I)⁻¹ X_c q_c        (√w_c cancels)

so a query is one pass over the rows (X_c q_c: what a TracIn scan reads, summed in float64) and
one N × N product per checkpoint with M_c = V_c diag(1/(S_c + λ)) V_cᵀ, formed from the stored
eigenpairs of K_c (V_c [N, r] float32, S_c). Exact at r = rank: X_c q_c lies in the span of K_c.
Exact means to float64's rounding of the formula, not float32's: with λ small against the top
eigenvalues, a float32 X_c q_c (or Vᵀ X_c q_c) carries rounding of the size of its large
components into every direction, where 1/λ multiplies it (relative errors of 1e-5 to 1e-4 at
d = 4,096); the scan therefore sums in float64 and the leading eigenpairs are applied in
float64 (``Plan``), the rest in float32; ``kernel_scan`` sums X_c q_c.
Truncated (r < rank, where the factors would pass ``kernel_factors.KERNEL_BYTES``), the left-out
eigenvalues take their mean μ_c: M_c = V_c diag(1/(S_c+λ) − 1/(μ_c+λ)) V_cᵀ + I / (μ_c+λ).
V_c holds N·r floats where the primal basis U_c holds d·r, so N < d keeps more eigenpairs in the
same bytes, and the query never reads a d-sided factor. M_c (N²·r flops) is formed when a λ
is asked for the second time: before that, and wherever r < N / 2, V_c is applied twice
(2·N·r floats read, not N²), so a one-off query never pays for M_c.

The search goes over the kept (unflagged) rows in order, which are the rows a search index holds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np
from scipy.linalg.blas import ssymv
from threadpoolctl import ThreadpoolController

from gradindex.store.kernel import check_lambdas
from gradindex.store.kernel_factors import lead_count
from gradindex.store.kernel_scan import scan_float64


@cache
def _blas() -> ThreadpoolController:
    """numpy's and scipy's BLAS libraries, found once (after both are loaded)."""
    return ThreadpoolController()


def one_query_blas(num_queries: int) -> AbstractContextManager:
    """One BLAS thread while one query is scored, as FAISS searches one query on one thread:
    a query's dual arithmetic is a run of small products, and waking the other BLAS threads
    for each of them (beside torch's and FAISS's OpenMP threads) costs more than it computes."""
    return _blas().limit(limits=1, user_api="blas") if num_queries == 1 else nullcontext()


@dataclass
class Plan:
    """How one checkpoint applies (K_c + λ)⁻¹ at one λ. The leading eigenpairs (S > 4λ, at most
    256: ``kernel_factors.lead_count``) go in float64, with their eigenvectors as stored in
    float64 (``dual_lead``): along them X_c q is large and its coefficient small, and float32
    rounding there (of the sums or of the eigenvectors), spread into the small-eigenvalue
    directions and multiplied by 1/λ, would cost about √(S / λ) of the scores' precision. The
    rest of y, small once they are taken out, goes through float32: V_c twice, or one N × N
    matrix."""

    top: np.ndarray  # [N, k] float64: the leading eigenvectors
    top_coef: np.ndarray  # [k] float64
    rest_coef: np.ndarray  # [r - k] float32
    matrix: np.ndarray | None  # [N, N] float32: V_rest diag(rest_coef) V_restᵀ, or None


class DualKernel:
    """One row set's dual factors and its rows; ``scores`` gives every kept row's kernel score
    for any λ (one N × N matrix per checkpoint, cached for the last λ asked)."""

    def __init__(
        self,
        rows: np.ndarray | Callable[[], np.ndarray],  # X [N, C·d]: the kept rows, index order
        basis: np.ndarray,  # V [C, N, r] float32: eigenvectors of K_c
        eigenvalues: np.ndarray,  # S [C, r], zero padded
        tail: np.ndarray,  # μ [C]: mean eigenvalue left out (0: exact)
        lambdas: Sequence[float],
        weights: Sequence[float],
        lead: np.ndarray | None = None,  # [C, N, k] float64: V's leading columns, unrounded
    ):
        self._read_rows = rows if callable(rows) else lambda: rows
        self._rows: np.ndarray | None = None  # [N, C·d], read on first use (not at `serve`)
        self.basis = np.ascontiguousarray(basis, dtype=np.float32)
        self.eigenvalues = np.asarray(eigenvalues, dtype=np.float64)
        self.tail = np.asarray(tail, dtype=np.float64)
        self.weights = np.asarray(weights, dtype=np.float64)
        self.lambdas = check_lambdas(list(lambdas), len(self.basis))
        self.lead = None if lead is None else np.asarray(lead, dtype=np.float64)
        self._cached: tuple[tuple[float, ...], list[Plan]] | None = None  # the last λ asked twice
        self._asked: tuple[float, ...] | None = None  # the λ of the last scores call

    def use_rows(self, rows: np.ndarray) -> None:
        """Score these rows instead of reading them (a search index's own float32 copy of the
        kept rows, in the same order: no second copy in memory)."""
        if rows.dtype != np.float32 or rows.shape[0] != self.num_rows:
            raise ValueError(f"rows {rows.shape} {rows.dtype} are not this kernel's kept rows")
        self._read_rows, self._rows = (lambda: rows), None

    def all_rows(self) -> np.ndarray:
        """The kept rows X [N, C·d] float32, read when first needed."""
        if self._rows is None:
            self._rows = np.ascontiguousarray(self._read_rows(), dtype=np.float32)
        return self._rows

    def block(self, c: int) -> np.ndarray:
        """Checkpoint c's columns of the kept rows, X_c [N, d] float32: a strided view (BLAS
        reads it in place)."""
        rows = self.all_rows()
        d = rows.shape[1] // len(self.basis)
        return rows[:, c * d : (c + 1) * d]

    @property
    def num_rows(self) -> int:
        return self.basis.shape[1]

    def _coef(self, c: int, lam: float) -> np.ndarray:
        """Per kept eigenpair, the coefficient of V_c diag(·) V_cᵀ in (K_c + λ)⁻¹ (zero pads
        give 0: they are not directions)."""
        s = self.eigenvalues[c]
        coef = np.where(s > 0, 1.0 / (s + lam), 0.0)
        if self.tail[c] > 0:
            coef = np.where(s > 0, coef - 1.0 / (lam + self.tail[c]), 0.0)
        return coef

    def _plan(self, c: int, lam: float, with_matrix: bool) -> Plan:
        """Checkpoint c's way to apply (K_c + λ)⁻¹ at this λ (see ``Plan``)."""
        k = lead_count(self.eigenvalues[c], lam)
        coef = self._coef(c, lam)
        v = self.basis[c][:, k:]
        rest = coef[k:].astype(np.float32)
        matrix = (v * rest) @ v.T if with_matrix and 2 * v.shape[1] >= len(v) else None
        top = self.basis[c][:, :k].astype(np.float64)
        if self.lead is not None:  # the stored float64 columns where there are enough
            m = min(k, self.lead.shape[2])
            top[:, :m] = self.lead[c][:, :m]
        return Plan(top, coef[:k], rest, matrix)

    def _plans(self, lambdas: list[float]) -> list[Plan]:
        """One ``Plan`` per checkpoint; the N × N matrices are formed (and kept) only when the
        same λ is asked twice in a row, so a one-off λ never pays for them."""
        key = tuple(lambdas)
        again, self._asked = self._asked == key, key
        if self._cached is not None and self._cached[0] == key:
            return self._cached[1]
        plans = [self._plan(c, lam, with_matrix=again) for c, lam in enumerate(lambdas)]
        if again:
            self._cached = (key, plans)
        return plans

    def _apply(self, c: int, lam: float, plan: Plan, y: np.ndarray) -> np.ndarray:
        """(K_c + λ)⁻¹ y for y [B, N] float64 (rows: queries' X_c q_c): the leading eigenpairs
        and the left-out mean in float64, what is left of y (small) through float32 V_c."""
        a = y @ plan.top
        # one pass over the leading eigenvectors for both products with them
        both = np.concatenate([a * plan.top_coef, a]) @ plan.top.T
        out, lead = both[: len(y)], both[len(y) :]
        if self.tail[c] > 0:
            out += y / (lam + self.tail[c])
        rest = (y - lead).astype(np.float32)
        if plan.matrix is not None and len(rest) == 1:  # one query: read half of M (symmetric)
            return out + ssymv(1.0, plan.matrix.T, rest[0], lower=0)[None]
        if plan.matrix is not None:
            return out + rest @ plan.matrix
        v = self.basis[c][:, len(plan.top_coef) :]
        return out + ((rest @ v) * plan.rest_coef) @ v.T

    def scores(self, queries: np.ndarray, lam: Any = None) -> np.ndarray:
        """Query rows [B, C·d] → kernel scores [B, N] float32 of every kept row."""
        num_ckpts = len(self.basis)
        lambdas = self.lambdas if lam is None else check_lambdas(lam, num_ckpts)
        with one_query_blas(len(queries)):
            q = np.asarray(queries, dtype=np.float32).reshape(len(queries), -1)
            y = scan_float64(self.all_rows(), q, num_ckpts)
            plans = self._plans(lambdas)
            out = np.zeros((len(queries), self.num_rows))
            for c in range(num_ckpts):
                out += self._apply(c, lambdas[c], plans[c], y[c])
        return out.astype(np.float32)

    def top_k(self, queries: np.ndarray, k: int, lam: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores [B, k] float32, kept-row positions [B, k] int64), best first, equal scores
        by position (1 <= k <= N)."""
        s = self.scores(queries, lam)
        part = np.argpartition(-s, k - 1, axis=1)[:, :k] if k < s.shape[1] else None
        pos = np.broadcast_to(np.arange(s.shape[1]), s.shape) if part is None else part
        top = np.take_along_axis(s, pos, 1)
        order = np.lexsort((pos, -top), axis=1)
        pos = np.take_along_axis(pos, order, 1).astype(np.int64)
        return np.take_along_axis(top, order, 1), pos

    def transform(self, queries: np.ndarray, lam: Any = None) -> np.ndarray:
        """Query rows [B, C·d] → q' [B, C·d] float32 with ⟨q', x(z)⟩ = the kernel score of every
        kept row (two passes over the rows: ``scores`` is the fast way to search).
        q'_c = q_c / (λ + μ_c) [truncated only] + X_cᵀ V_c diag(coef / (w_c S_c)) V_cᵀ X_c q_c,
        since X_c X_cᵀ V_c = w_c V_c S_c."""
        num_ckpts = len(self.basis)
        lambdas = self.lambdas if lam is None else check_lambdas(lam, num_ckpts)
        q = np.asarray(queries, dtype=np.float32).reshape(len(queries), num_ckpts, -1)
        out = np.empty(q.shape, dtype=np.float32)
        for c in range(num_ckpts):
            s, v, x = self.eigenvalues[c], self.basis[c], self.block(c)
            coef = np.where(s > 0, self._coef(c, lambdas[c]) / (self.weights[c] * s + 1e-300), 0)
            inner = ((q[:, c] @ x.T) @ v) * coef.astype(np.float32)
            out[:, c] = (inner @ v.T) @ x
            if self.tail[c] > 0:
                out[:, c] += q[:, c] * np.float32(1.0 / (lambdas[c] + self.tail[c]))
        return out.reshape(len(queries), -1)
