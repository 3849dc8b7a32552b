"""X_c q_c for every checkpoint, summed in float64 from the float32 rows, at a float32 scan's cost.

Why float64: the dual kernel (``kernel_dual``) multiplies the rounding of X_c q by up to 1/λ,
so a float32 sum (BLAS's sgemv) costs the scores 1e-5 to 1e-4 of their precision. Why not
BLAS in float64: its rows must be widened first, a copy twice the size of what it reads, which
made the scan cost 4-5 float32 scans. A compiled loop (numba) widens each float32 as it loads
it and reads the rows once, four rows per pass over the query, as FAISS's flat scan does; it
serves one or two queries. More queries at once share one widening per block of rows (a BLAS
product), and where numba is missing (not installed, or a platform it lacks) that path gives
the same sums for every batch.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import numpy as np

SCAN_BYTES = 2**22
"""Rows widened to float64 at a time by the BLAS path (a cache-sized buffer, not a copy)."""

FUSED_MAX_QUERIES = 2
"""Up to this many queries read the rows once each through the compiled loop; above it, one
widening of each block of rows serves all of them."""

Fused = Callable[[np.ndarray, np.ndarray, np.ndarray], None]


@cache
def fused_scan() -> Fused | None:
    """The compiled loop (x [N, C, d] float32, q [B, C, d] float64, out [C, B, N] float64), or
    None without numba. Compiled on first use and cached on disk by numba."""
    try:
        from numba import njit
    except ImportError:  # the BLAS path below gives the same sums
        return None

    def scan(x, q, out):  # pragma: no cover - compiled; tested through ``scan_float64``
        n, num_ckpts, d = x.shape
        for b in range(q.shape[0]):
            for c in range(num_ckpts):
                i = 0
                while i + 4 <= n:  # four rows per pass: each query value loaded once
                    a0 = a1 = a2 = a3 = 0.0
                    for k in range(d):
                        qk = q[b, c, k]
                        a0 += x[i, c, k] * qk
                        a1 += x[i + 1, c, k] * qk
                        a2 += x[i + 2, c, k] * qk
                        a3 += x[i + 3, c, k] * qk
                    out[c, b, i] = a0
                    out[c, b, i + 1] = a1
                    out[c, b, i + 2] = a2
                    out[c, b, i + 3] = a3
                    i += 4
                while i < n:
                    acc = 0.0
                    for k in range(d):
                        acc += x[i, c, k] * q[b, c, k]
                    out[c, b, i] = acc
                    i += 1

    options = {"fastmath": {"reassoc", "contract"}, "nogil": True}
    try:
        return njit(cache=True, **options)(scan)
    except RuntimeError:  # no writable place for numba's cache: compile in each process
        return njit(**options)(scan)


def scan_float64(rows: np.ndarray, queries: np.ndarray, num_ckpts: int) -> np.ndarray:
    """rows [N, C·d] float32 (C-contiguous), queries [B, C·d] → X_c q_c [C, B, N] float64,
    every product and sum in float64."""
    n, width = rows.shape
    d = width // num_ckpts
    q = np.ascontiguousarray(queries, dtype=np.float64).reshape(len(queries), num_ckpts, d)
    out = np.empty((num_ckpts, len(queries), n))
    fused = fused_scan() if len(queries) <= FUSED_MAX_QUERIES else None
    if fused is not None and rows.flags.c_contiguous and rows.dtype == np.float32:
        fused(rows.reshape(n, num_ckpts, d), q, out)
        return out
    step = max(1, SCAN_BYTES // (8 * width))
    buf = np.empty((min(step, n), width))
    for a in range(0, n, step):
        b = min(n, a + step)
        wide = buf[: b - a]
        wide[...] = rows[a:b]
        for c in range(num_ckpts):
            out[c, :, a:b] = q[:, c] @ wide[:, c * d : (c + 1) * d].T
    return out
