"""The eigen factors of one row set's per-checkpoint Grams, computed from the stored rows.

G_c = Σ_z φ_c(z) φ_c(z)ᵀ has rank ≤ min(N, d), so it is never stored: ``kernel.h5`` keeps its
top r eigenpairs (U_c [d, r] float32, Λ_c [r]), the mean μ_c of the eigenvalues left out, the
trace and the top eigenvalue (the λ rule's inputs). A kernel query is then

    (G_c + λ I)⁻¹ q = q / (λ + μ_c) + U_c diag(1 / (Λ_c + λ) − 1 / (λ + μ_c)) U_cᵀ q,

exact when r is the rank (μ_c = 0), and one d × r product each way per checkpoint.

How they are computed (always from the rows, never from a d × d inverse):
- N ≤ d: the dual. K = Φ Φᵀ (N × N) = V S Vᵀ, U = Φᵀ V S^{-1/2}, all N eigenpairs exact.
- N > d, d ≤ EIGH_MAX: the Gram streamed in float64, ``numpy.linalg.eigh``.
- N > d > EIGH_MAX: the streamed Gram's top r by subspace iteration (a full eigh of 8192² takes
  minutes), the left-out mean from the trace.

r is the rank when the exact factors fit ``rank_bounds``'s cap; else at least its floor and
every eigenvalue above KEEP_ABOVE · λ, up to the cap.

Where N < d the factors are kept in the dual form instead (``dual=True``,
:mod:`gradindex.store.kernel_dual`): V_c [N, r], the eigenvectors of K = Φ Φᵀ themselves, N·r
floats instead of d·r, r = the rank up to ``dual_bounds``'s cap (the query's cost does not grow
with r, so every eigenpair that fits is kept).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from gradindex.store.vectors import ChunkedRows

EIGH_MAX = 4096
"""Largest Gram side decomposed in full (``eigh`` grows as d³; wider ones use subspace iteration)."""
KERNEL_BYTES = 60 * 2**20
"""Most bytes the factors of both row sets may take on disk (and in memory when served): with
the eigenvalues and HDF5's own bytes, kernel.h5 stays under 64 MB (10⁶ bytes) at any N."""
FREE_BYTES = 4 * 2**20
"""Factors of one row set up to this size are always exact: their query transform reads little,
whatever N."""
ZERO = 1e-12
"""Eigenvalues below ZERO × the top one are rounding, not rank."""
KEEP_ABOVE = 0.03
"""Eigenvalues above KEEP_ABOVE · λ are kept up to the cap, past the floor: one left out
changes its direction's coefficient 1/(Λ + λ) by up to that share (replaced by the mean)."""
DEFLATE_ABOVE = 4.0
"""A dual kernel applies its eigenpairs with S > DEFLATE_ABOVE · λ in float64 (``kernel_dual.Plan``)
and ``kernel.h5`` keeps those eigenvectors in float64 too (``dual_lead``)."""
MAX_DEFLATED = 256
"""At most this many per checkpoint: N · MAX_DEFLATED doubles per query."""
LAMBDA_SCALE = 3.0
"""s of the default λ_c = s · (trace(G_c) − ‖G_c‖₂) / d: the mean eigenvalue with the top one
left out, which alone is ~99% of the trace of 'square'-loss rows and ~40-60% of 'mse' ones
(one ridge rule then fits both). s was chosen once on 100 calibration digits of
``benchmarks/bench_lds.py``, never on its LDS targets (``benchmarks/results/lds.md``)."""


@dataclass
class Factors:
    """One row set's kernel factors: basis [C, d, r] float32 and eigenvalues [C, r] (zero
    padded past a checkpoint's own rank), and per checkpoint the mean left-out eigenvalue,
    trace and top eigenvalue, the rank kept and whether nothing non-zero was left out."""

    basis: np.ndarray
    eigenvalues: np.ndarray
    tail: np.ndarray
    trace: np.ndarray
    top: np.ndarray
    exact: bool
    dual: bool = False
    """basis is V [C, N, r] (eigenvectors of K_c = Φ_c Φ_cᵀ), not U [C, d, r]."""
    lead: np.ndarray | None = None
    """The dual's leading eigenvectors in float64, V_c[:, :k] [C, N, k], k the most of any
    checkpoint with S > DEFLATE_ABOVE · λ_c (``lead_count``): float32 rounding of those
    columns, times the large X_c q along them, would reach the scores through 1/λ."""


def rank_bounds(num_rows: int, d: int, num_ckpts: int) -> tuple[int, int]:
    """(floor, cap) of the eigenpairs a row set keeps. The floor: the larger of N / 4 (so the
    transform, two passes over C·d·r floats, costs at most half an exact scan of the N·C·d
    stored floats) and what FREE_BYTES holds; the cap: KERNEL_BYTES for both row sets. Between
    them every eigenvalue above KEEP_ABOVE · λ is kept."""
    per_pair = 4 * d * num_ckpts
    cap = max(1, KERNEL_BYTES // (2 * per_pair))
    return min(cap, max(1, num_rows // 4, FREE_BYTES // per_pair)), cap


def dual_bounds(num_rows: int, num_ckpts: int) -> tuple[int, int]:
    """(floor, cap) of the eigenpairs a dual row set keeps when its N × N Gram is too large to
    decompose in full (N > EIGH_MAX): an even share of KERNEL_BYTES, less what its float64
    leading eigenvectors may take (up to MAX_DEFLATED of the r columns, each as two float32
    ones: r + 2 · min(MAX_DEFLATED, r) columns in all), which are known only once computed."""
    share = max(1, dual_columns(num_rows, num_ckpts) // 2)
    cap = share - 2 * MAX_DEFLATED if share >= 3 * MAX_DEFLATED else share // 3
    return max(1, cap), max(1, cap)


def dual_columns(num_rows: int, num_ckpts: int) -> int:
    """The dual columns KERNEL_BYTES holds for both row sets together: each set stores V
    [C, N, width] float32, so this bounds the sum of the two widths."""
    return max(2, KERNEL_BYTES // (4 * num_rows * num_ckpts))


def lead_columns(factors: dict[str, Factors]) -> int:
    """The float32 columns the row sets' float64 leading eigenvectors take (two each)."""
    return sum(2 * f.lead.shape[2] for f in factors.values() if f.lead is not None)


def share_columns(factors: dict[str, Factors], columns: int, d: int) -> dict[str, Factors]:
    """Trim dual factors computed in full to ``columns`` (``dual_columns``) for all row sets
    together. One threshold τ, common to every set and checkpoint, sets the widths: a
    checkpoint keeps its eigenpairs with S > τ · λ_c (λ_c its default), a set's width is its
    widest checkpoint's, and τ is the smallest whose widths fit. An eigenvalue far below λ_c
    barely moves its coefficient 1/(S + λ) from the left-out mean's, so a set whose spectrum
    falls off fast (heavy-tailed TracIn rows) gives columns to a flatter one (unit ReTrac rows)
    rather than the two splitting the bytes evenly."""
    ratios = {}
    for r, f in factors.items():
        lam = np.array([lambda_rule(t, top, d) for t, top in zip(f.trace, f.top, strict=True)])
        ratios[r] = f.eigenvalues / lam[:, None]  # descending per checkpoint, zero padded

    def widths(tau: float) -> dict[str, int]:
        return {r: max(1, int((x > tau).sum(axis=1).max())) for r, x in ratios.items()}

    taus = np.unique(np.concatenate([x[x > 0] for x in ratios.values()] + [np.zeros(1)]))
    lo, hi = 0, len(taus) - 1  # the widths shrink as τ grows: the smallest τ that fits
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if sum(widths(taus[mid]).values()) <= columns else (mid + 1, hi)
    chosen = widths(taus[lo])
    return {r: trimmed(f, chosen[r]) for r, f in factors.items()}


def trimmed(f: Factors, width: int) -> Factors:
    """Factors ``f`` (every non-zero eigenpair kept) cut to their first ``width`` eigenpairs per
    checkpoint, the mean of the ones left out as each checkpoint's tail."""
    eig = f.eigenvalues[:, :width].copy()
    tail = np.zeros(len(eig))
    for c, full in enumerate(f.eigenvalues):
        left = int(np.sum(full > 0)) - int(np.sum(eig[c] > 0))
        tail[c] = max(f.trace[c] - float(eig[c].sum()), 0.0) / left if left > 0 else 0.0
    basis = np.ascontiguousarray(f.basis[:, :, :width])
    lead = None if f.lead is None else f.lead[:, :, :width]
    return Factors(basis, eig, tail, f.trace, f.top, bool(np.all(tail == 0)), f.dual, lead)


def lead_count(eigenvalues: np.ndarray, lam: float) -> int:
    """How many leading eigenpairs a dual kernel applies in float64 at this λ."""
    return int(min(MAX_DEFLATED, np.sum(eigenvalues > DEFLATE_ABOVE * lam)))


def lambda_rule(trace: float, top: float, d: int) -> float:
    """λ = LAMBDA_SCALE · (trace − top eigenvalue) / d; trace / d in its place when the rows
    span one direction, 1.0 when they are all zero (see ``gradindex.store.kernel``)."""
    rest = trace - top if trace > 0 else 0.0
    lam = LAMBDA_SCALE * (rest if rest > 1e-9 * trace else trace) / d
    return lam if math.isfinite(lam) and lam > 0 else 1.0


def checkpoint_blocks(rows, keep: np.ndarray, c: int, d: int, weight: float) -> Iterator:
    """Checkpoint ``c``'s columns of the kept rows, φ = block / √w, float64, chunk by chunk."""
    scale = 1.0 / np.sqrt(weight)
    for _, block in ChunkedRows(rows, keep).chunks():
        yield block[:, c * d : (c + 1) * d].astype(np.float64) * scale


def top_eigenpairs(gram: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray]:
    """(eigenvalues descending [r], vectors [n, r]) of a symmetric PSD matrix: every one by
    eigh up to EIGH_MAX, else the top r by subspace iteration from a fixed start (reproducible)."""
    n = len(gram)
    if n <= EIGH_MAX:
        w, v = np.linalg.eigh(gram)
        return w[::-1][:r], v[:, ::-1][:, :r]
    rng = np.random.default_rng(0)
    q = np.linalg.qr(gram @ rng.standard_normal((n, min(n, r + 16))))[0]
    for _ in range(4):  # power steps: the spectrum's tail falls off, four are plenty
        q = np.linalg.qr(gram @ q)[0]
    w, v = np.linalg.eigh(q.T @ gram @ q)
    return w[::-1][:r], (q @ v[:, ::-1])[:, :r]


def checkpoint_factors(
    rows, keep: np.ndarray, c: int, d: int, weight: float, bounds: tuple[int, int], dual: bool
) -> tuple:
    """(U [d, r] or with ``dual`` V [N, r], Λ [r], mean left-out eigenvalue, trace, top
    eigenvalue, the dual's leading eigenvectors in float64 or None) of checkpoint c, r within
    ``bounds`` = (floor, cap) (``rank_bounds``)."""
    n, (floor, r) = len(keep), bounds
    if n <= d:  # the dual: Φ is at most d × d floats
        blocks = list(checkpoint_blocks(rows, keep, c, d, weight))
        phi = np.concatenate(blocks) if blocks else np.zeros((0, d))
        full = n <= EIGH_MAX
        s, v = top_eigenpairs(phi @ phi.T, n if full else r)
        trace = float(np.einsum("ij,ij->", phi, phi))
    else:
        gram = np.zeros((d, d))
        for b in checkpoint_blocks(rows, keep, c, d, weight):
            gram += b.T @ b
        trace = float(np.trace(gram))
        full = d <= EIGH_MAX
        s, v = top_eigenpairs(gram, d if full else r)
        phi = None
    top = float(s[0]) if len(s) else 0.0
    nonzero = int(np.sum(s > ZERO * top)) if top > 0 else 0
    above = int(np.sum(s > KEEP_ABOVE * lambda_rule(trace, top, d)))
    kept = min(r, nonzero, max(floor, above))
    s_kept = s[:kept]
    # the dual's U = Φᵀ V S^{-1/2}: unit columns, orthogonal
    u = v[:, :kept] if phi is None or dual else phi.T @ (v[:, :kept] / np.sqrt(s_kept))
    left = nonzero - kept if full else min(n, d) - kept
    tail = max(trace - float(s_kept.sum()), 0.0) / left if left > 0 else 0.0
    lead = v[:, : lead_count(s_kept, lambda_rule(trace, top, d))].copy() if dual else None
    return u, s_kept, tail, trace, top, lead


def row_set_factors(
    rows, keep: np.ndarray, weights, d: int, bounds: tuple[int, int], dual: bool = False
) -> Factors:
    """Factors of every checkpoint of one row set (``rows``: its h5py dataset or array);
    ``dual`` (N < d only): V_c [N, r] rather than U_c [d, r]."""
    dual = dual and 0 < len(keep) < d
    side, cap = (len(keep) if dual else d), max(1, min(bounds[1], len(keep), d))
    basis = np.zeros((len(weights), side, cap), dtype=np.float32)  # each checkpoint's u, as
    eig = np.zeros((len(weights), cap))  # computed: no float64 bases held side by side
    tail, trace, top = (np.zeros(len(weights)) for _ in range(3))
    leads = []
    for c, w in enumerate(weights):
        u, s, tail[c], trace[c], top[c], lead = checkpoint_factors(
            rows, keep, c, d, w, bounds, dual
        )
        basis[c, :, : len(s)], eig[c, : len(s)] = u, s
        leads.append(lead)
    width = max(1, int((eig > 0).sum(axis=1).max()))
    return Factors(
        basis=np.ascontiguousarray(basis[:, :, :width]) if width < cap else basis,
        eigenvalues=eig[:, :width],
        tail=tail,
        trace=trace,
        top=top,
        exact=bool(np.all(tail == 0)),
        dual=dual,
        lead=stack_leads(leads) if dual else None,
    )


def stack_leads(leads: list[np.ndarray]) -> np.ndarray | None:
    """Per-checkpoint leading eigenvectors [N, k_c] → [C, N, max k_c] float64, zero padded;
    None where no checkpoint has any."""
    width = max(x.shape[1] for x in leads)
    if width == 0:
        return None
    out = np.zeros((len(leads), len(leads[0]), width))
    for c, x in enumerate(leads):
        out[c, :, : x.shape[1]] = x
    return out
