"""The dual form of a kernel method: row sets with fewer rows than columns per checkpoint.

With X_c the stored rows' checkpoint-c block (N × d, each row √w_c φ_c(z)), q_c the query's block
and K_c = Φ_c Φ_cᵀ = X_c X_cᵀ / w_c the N × N Gram of the features (the primal G_c = Φ_cᵀ Φ_c has
the same non-zero eigenvalues), the push-through identity gives every row's score at once:

    scores_c = X_c (G_c + λ_c I)⁻¹ q_c = (K_c + λ_c I)⁻¹ X_c q_c        (√w_c cancels)

so a query is one pass over the rows (X_c q_c: what a TracIn scan reads) and one N × N product
per checkpoint with M_c = V_c diag(1/(S_c + λ)) V_cᵀ, formed from the stored
eigenpairs of K_c (V_c [N, r] float32, S_c). Exact at r = rank: X_c q_c lies in the span of K_c.
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
from typing import Any

import numpy as np

from gradindex.store.kernel import check_lambdas


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
    ):
        self._read_rows = rows if callable(rows) else lambda: rows
        self._rows: np.ndarray | None = None  # [N, C·d], read on first use (not at `serve`)
        self.basis = np.ascontiguousarray(basis, dtype=np.float32)
        self.eigenvalues = np.asarray(eigenvalues, dtype=np.float64)
        self.tail = np.asarray(tail, dtype=np.float64)
        self.weights = np.asarray(weights, dtype=np.float64)
        self.lambdas = check_lambdas(list(lambdas), len(self.basis))
        self._solver: tuple[tuple[float, ...], list[np.ndarray | None]] | None = None
        self._asked: tuple[float, ...] | None = None  # the λ of the last scores call

    def use_rows(self, rows: np.ndarray) -> None:
        """Score these rows instead of reading them (a search index's own float32 copy of the
        kept rows, in the same order: no second copy in memory)."""
        if rows.dtype != np.float32 or rows.shape[0] != self.num_rows:
            raise ValueError(f"rows {rows.shape} {rows.dtype} are not this kernel's kept rows")
        self._read_rows, self._rows = (lambda: rows), None

    def block(self, c: int) -> np.ndarray:
        """Checkpoint c's columns of the kept rows, X_c [N, d] float32: a strided view (BLAS
        reads it in place), the rows read when first needed."""
        if self._rows is None:
            self._rows = np.ascontiguousarray(self._read_rows(), dtype=np.float32)
        d = self._rows.shape[1] // len(self.basis)
        return self._rows[:, c * d : (c + 1) * d]

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

    def _solvers(self, lambdas: list[float]) -> list[np.ndarray | None]:
        """M_c [N, N] float32 for each checkpoint, or None where V_c is applied twice (all
        None the first time a λ is asked)."""
        key = tuple(lambdas)
        first, self._asked = self._asked != key, key
        if first and (self._solver is None or self._solver[0] != key):
            return [None] * len(lambdas)
        if self._solver is None or self._solver[0] != key:
            out: list[np.ndarray | None] = []
            for c, lam in enumerate(lambdas):
                v, coef = self.basis[c], self._coef(c, lam).astype(np.float32)
                if 2 * v.shape[1] < len(v):
                    out.append(None)
                    continue
                m = (v * coef) @ v.T
                if self.tail[c] > 0:
                    m[np.diag_indices_from(m)] += np.float32(1.0 / (lam + self.tail[c]))
                out.append(m)
            self._solver = (key, out)
        return self._solver[1]

    def _apply(self, c: int, lam: float, solver: np.ndarray | None, b: np.ndarray) -> np.ndarray:
        """(K_c + λ)⁻¹ b for b [B, N] (rows: queries' X_c q_c)."""
        if solver is not None:
            return b @ solver  # M_c is symmetric
        v = self.basis[c]
        out = ((b @ v) * self._coef(c, lam).astype(np.float32)) @ v.T
        if self.tail[c] > 0:
            out += b * np.float32(1.0 / (lam + self.tail[c]))
        return out

    def scores(self, queries: np.ndarray, lam: Any = None) -> np.ndarray:
        """Query rows [B, C·d] → kernel scores [B, N] float32 of every kept row."""
        num_ckpts, n, _ = self.basis.shape
        lambdas = self.lambdas if lam is None else check_lambdas(lam, num_ckpts)
        q = np.asarray(queries, dtype=np.float32).reshape(len(queries), num_ckpts, -1)
        solvers = self._solvers(lambdas)
        out = np.zeros((len(q), n), dtype=np.float32)
        for c in range(num_ckpts):
            b = q[:, c] @ self.block(c).T  # [B, N]: one pass over the block, as TracIn's
            out += self._apply(c, lambdas[c], solvers[c], b)
        return out

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
