"""Build-time choice and validation of approximate indexes (used by :mod:`gradindex.search.faiss_index`).

Holds:

- :func:`choose_kind` -- what ``kind="auto"`` builds for N rows of dimension D, and why.
- :func:`make_index` -- a trained and filled FAISS index for a kind or a factory string.
- :func:`check_kind` -- refuse an index kind or factory string FAISS cannot build, before any
  row is computed.
- :func:`training_rows` -- the sorted sample of rows an index is trained on.
- :func:`index_parts` / :func:`apply_knobs` -- find and set the search-time knobs
  (``nprobe`` of an IVF, ``efSearch`` of an HNSW, ``k_factor`` of an exact re-ranking stage).
- :func:`heldout_queries` -- the queries recall is measured on.
- :func:`tune` -- the ladder: raise the knobs until recall@10 against exact search reaches the
  target on two disjoint halves of the held-out queries, or report that it cannot.

Approximate indexes are never trusted on faith: inner-product IVF/HNSW recall depends on the
data (heavy-tailed TracIn norms break IVF on data where HNSW is fine), so every one is measured
against exact search on the rows it indexes before it is used.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import faiss
import numpy as np

from gradindex.errors import SearchError
from gradindex.featurize.budget import available_memory
from gradindex.search.exact import has_exact_rows
from gradindex.search.faiss_common import faiss_reason, first_line

logger = logging.getLogger(__name__)

RECALL_K = 10
"""Recall is measured as recall@10 (top 10 of exact search)."""
AUTO_FLAT_BELOW = 20_000
"""``auto`` uses exact flat search below this many rows: a scan is then cheap at D=512."""
AUTO_FLAT_MAX_BYTES = 16 << 20
"""...and whenever the whole matrix is this small (docs/search.md#why-the-search-code-is-shaped-this-way)."""
MAX_SCAN_FRACTION = 0.25
"""A ladder stops before an index would visit more than this share of the rows per query:
beyond it the approximate index is no longer clearly faster than a flat scan."""
HNSW_M = 32
HELDOUT_QUERIES = 1000
QUERY_NOISE = 1.0
"""Held-out query = unit(row) + isotropic Gaussian noise of this expected norm."""

NPROBE_GRID = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768)
NPROBE_GRID += tuple(1024 * 2**i for i in range(7))
_EF_GRID = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
_K_FACTORS = (16, 8, 4, 2, 1)  # largest first, then shrunk while recall holds


def choose_kind(n: int, d: int) -> str:
    """The kind ``auto`` builds: flat when a scan is cheap, else HNSW, else IVF if memory is short.

    HNSW is preferred because it holds recall@10 >= 0.95 for both methods at a small fraction of
    a scan's cost, where inner-product IVF probing a large share of its lists stays far below
    that on heavy-tailed TracIn norms (docs/search.md#why-the-search-code-is-shaped-this-way). HNSW walks its graph at random,
    so when the index would not fit comfortably in memory (memory-mapped use) IVF is chosen.
    """
    if n < AUTO_FLAT_BELOW or n * d * 4 <= AUTO_FLAT_MAX_BYTES:
        return "flat"
    hnsw_bytes = n * (4 * d + HNSW_M * 2 * 4 * 1.1)
    avail = available_memory()
    if avail is not None and hnsw_bytes > 0.5 * avail:
        return "ivf"
    return "hnsw"


def factory_for(kind: str, n: int) -> str:
    """The FAISS factory string of a named approximate kind for n rows."""
    if kind == "hnsw":
        return f"HNSW{HNSW_M},Flat"
    if kind == "ivf":
        # ~4 sqrt(N) lists (a power of two), with >= 39 training rows per list as FAISS wants.
        nlist = 2 ** round(math.log2(max(4 * math.sqrt(n), 1)))
        nlist = max(1, min(nlist, 65536, n // 39))
        return f"IVF{nlist},Flat"
    raise SearchError(f"no factory string for kind {kind!r}")


def make_index(factory: str, x: np.ndarray, seed: int) -> tuple[faiss.Index, str]:
    """Train and fill an inner-product index; wrap lossy codes in an exact re-ranking stage.

    Returns the index and its factory string (with ``,RFlat`` appended when wrapped). Lossy codes
    (PQ, SQ, a PCA...) cannot answer ``exact=True``, so they get an ``IndexRefineFlat`` that keeps
    the float32 rows, re-ranks ``k_factor * k`` candidates exactly and serves exact search.
    """
    n, d = x.shape
    try:
        index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise SearchError(
            f"FAISS cannot build factory string {factory!r}: {first_line(e)}; "
            "use 'flat', 'ivf', 'hnsw', 'auto' or a valid faiss.index_factory string"
        ) from None
    if index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise SearchError(f"factory string {factory!r} does not search by inner product")
    ivf = index_parts(index).get("ivf")
    if ivf is not None:
        ivf.cp.seed = seed
    plain = faiss.downcast_index(index)
    if isinstance(plain, faiss.IndexPQ):  # polysemous training (minutes) serves no search here
        plain.do_polysemous_training = False
    if not has_exact_rows(index):
        inner = index
        index = faiss.IndexRefineFlat(inner)
        inner.this.disown()  # the refine wrapper owns and frees it
        index.own_fields = True
        factory = f"{factory},RFlat"
    try:
        if not index.is_trained:
            rows = training_rows(n, ivf.nlist if ivf is not None else 0, seed)
            index.train(x if rows is None else x[rows])
        index.add(x)
    except RuntimeError as e:
        raise SearchError(
            f"FAISS could not train/fill {factory!r} on {n}x{d} vectors: {first_line(e)}"
        ) from None
    return index, factory


NAMED_KINDS = ("flat", "ivf", "hnsw", "auto", "ondisk")
"""Index kinds by name (``ondisk``: :mod:`gradindex.search.ondisk`); anything else is a factory string."""


def check_kind(kind: object, d: int, target_recall: object = 0.95) -> None:
    """Refuse an index kind FAISS cannot build over rows of dimension ``d``, and a target recall
    outside (0, 1], by reason: an empty index is made from a factory string (no training), so a
    long build does not end in a FAISS error after every row was computed."""
    if isinstance(target_recall, bool) or not isinstance(target_recall, int | float):
        raise SearchError(f"target recall must be a number in (0, 1]; got {target_recall!r}")
    if not 0 < target_recall <= 1:
        raise SearchError(f"target recall must be in (0, 1]; got {target_recall!r}")
    if not isinstance(kind, str) or not kind.strip():
        raise SearchError(
            f"index kind {kind!r}: use {', '.join(NAMED_KINDS)} or a FAISS factory string"
        )
    if kind in NAMED_KINDS:
        return
    try:
        index = faiss.index_factory(int(d), kind, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise SearchError(
            f"index kind {kind!r} is neither {', '.join(NAMED_KINDS)} nor a FAISS factory string "
            f"FAISS can build over {d} dimensions: {faiss_reason(e)}"
        ) from None
    if index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise SearchError(f"factory string {kind!r} does not search by inner product")


def training_rows(n: int, nlist: int, seed: int) -> np.ndarray | None:
    """The sorted rows of n an index with ``nlist`` lists is trained on; None means all of them.

    max(10 000, 40 * nlist) rows (FAISS asks for >= 39 per list), drawn under ``seed``: the same
    sample whether the rows are in RAM or read from a store in chunks (:mod:`gradindex.search.ondisk`).
    """
    rng = np.random.default_rng(seed)
    m = min(n, max(40 * nlist, 10_000))
    return None if m >= n else np.sort(rng.choice(n, m, replace=False))


def index_parts(index: faiss.Index) -> dict[str, faiss.Index]:
    """The IVF / HNSW / refine stages inside an index (those that carry a search-time knob)."""
    parts: dict[str, faiss.Index] = {}
    cur = faiss.downcast_index(index)
    for _ in range(8):
        if isinstance(cur, faiss.IndexRefine):
            parts["refine"] = cur
            cur = faiss.downcast_index(cur.base_index)
        elif isinstance(cur, faiss.IndexPreTransform):
            cur = faiss.downcast_index(cur.index)
        elif isinstance(cur, faiss.IndexIVF):
            parts["ivf"] = cur
            break
        elif isinstance(cur, faiss.IndexHNSW):
            parts["hnsw"] = cur
            break
        else:
            break
    return parts


def apply_knobs(index: faiss.Index, knobs: dict[str, int]) -> None:
    """Set nprobe / efSearch / k_factor on the stages that have them (stored in the FAISS file)."""
    parts = index_parts(index)
    if "nprobe" in knobs and "ivf" in parts:
        parts["ivf"].nprobe = int(knobs["nprobe"])
    if "efSearch" in knobs and "hnsw" in parts:
        parts["hnsw"].hnsw.efSearch = int(knobs["efSearch"])
    if "k_factor" in knobs and "refine" in parts:
        parts["refine"].k_factor = float(knobs["k_factor"])


def _main_grid(parts: dict[str, faiss.Index], n: int) -> list[dict[str, int]]:
    if "ivf" in parts:
        nlist = parts["ivf"].nlist
        cap = max(1, int(nlist * MAX_SCAN_FRACTION))
        return [{"nprobe": v} for v in sorted({v for v in NPROBE_GRID if v < cap} | {cap})]
    if "hnsw" in parts:
        cap = max(_EF_GRID[0], min(_EF_GRID[-1], int(n * MAX_SCAN_FRACTION)))
        return [{"efSearch": v} for v in sorted({v for v in _EF_GRID if v < cap} | {cap})]
    return [{}]


def heldout_queries(x: np.ndarray, m: int, seed: int) -> np.ndarray:
    """m queries near the data: unit(random row) + N(0, I/D) * QUERY_NOISE.  # [m, D]

    Perturbed rows rather than a held-out split because every row must stay in the index; the
    noise (as large as the unit row) keeps each query from simply retrieving its own row.
    """
    n, d = x.shape
    rng = np.random.default_rng(seed)
    rows = rng.choice(n, size=m, replace=m > n)
    base = x[rows].astype(np.float32, copy=True)
    norms = np.linalg.norm(base, axis=1, keepdims=True)
    np.divide(base, norms, out=base, where=norms > 0)
    noise = rng.standard_normal((m, d), dtype=np.float32) * np.float32(QUERY_NOISE / math.sqrt(d))
    return np.ascontiguousarray(base + noise, dtype=np.float32)


def recall_at_k(found: np.ndarray, q: np.ndarray, x: np.ndarray, exact: np.ndarray) -> float:
    """Share of returned rows whose true score reaches the exact k-th score.

    found [B, k] rows (-1 = missing), q [B, D], x [N, D], exact [B, k] exact scores, best first.
    Scoring by threshold rather than id overlap keeps exact ties from counting as misses.
    """
    valid = found >= 0
    s = np.einsum("bd,bkd->bk", q, x[np.where(valid, found, 0)])  # [B, k]
    tol = 1e-5 * np.abs(exact[:, :1]) + 1e-30
    return float((valid & (s >= exact[:, -1:] - tol)).mean())


@dataclass
class TuneReport:
    """What the ladder found: the knobs, their recall on both halves, and every step tried."""

    met: bool
    knobs: dict[str, int]
    recall: float  # on the validation half
    tune_recall: float  # on the tuning half
    n_queries: int
    steps: list[dict] = field(default_factory=list)


TUNE_MARGIN = 0.01


def tune(
    index: faiss.Index,
    x: np.ndarray,
    target: float,
    queries: np.ndarray,
    k: int = RECALL_K,
    *,
    exact_scores: np.ndarray | None = None,
) -> TuneReport:
    """Climb the knob ladder until recall@k >= target on both halves of ``queries``.

    The main knob (nprobe / efSearch) rises along a grid capped at MAX_SCAN_FRACTION of the rows;
    a rung counts only if it passes on the tuning half and then on the validation half. An exact
    re-ranking stage (lossy codes only) is climbed at its largest k_factor, which is then shrunk
    while recall holds. Recall grows with the knobs, so the top rung is first probed on a fifth of
    the tuning half: if it clearly misses (by 0.02), the climb is skipped and that probe is the
    reported recall. Leaves the index at the passing knobs, or at the top rung when none passes.

    x: the indexed rows [N, D], an array or any object with ``len`` that gathers rows by an
    integer array (``x[rows]`` -> [*rows.shape, D]), e.g. :class:`gradindex.search.ondisk.ChunkedRows`;
    then ``exact_scores`` [M, k] (the exact top-k scores of ``queries``, best first) must be given.
    """
    k = min(k, len(x))
    half = len(queries) // 2
    qt, qv = queries[:half], queries[half:]
    if exact_scores is None:
        exact_t, _ = faiss.knn(qt, x, k, metric=faiss.METRIC_INNER_PRODUCT)
        exact_v, _ = faiss.knn(qv, x, k, metric=faiss.METRIC_INNER_PRODUCT)
    else:
        exact_t, exact_v = exact_scores[:half, :k], exact_scores[half:, :k]
    parts = index_parts(index)
    kfs = _K_FACTORS if "refine" in parts else (None,)
    rungs = [dict(m, **({"k_factor": kfs[0]} if kfs[0] else {})) for m in _main_grid(parts, len(x))]
    steps: list[dict] = []

    def measure(knobs: dict[str, int], which: str) -> float:
        q, ex = (qt, exact_t) if which != "validate" else (qv, exact_v)
        if which == "probe":
            q, ex = q[: max(1, len(q) // 5)], ex[: max(1, len(q) // 5)]
        apply_knobs(index, knobs)
        r = recall_at_k(index.search(q, k)[1], q, x, ex)
        steps.append({"knobs": dict(knobs), "queries": which, "recall": r})
        logger.info("ladder %s on %s queries: recall@%d %.4f", knobs, which, k, r)
        return r

    # the tuning half must clear the target by a margin: indexes tuned to pass exactly land
    # just under it on unseen queries
    tune_target = min(1.0, target + TUNE_MARGIN)

    def passes(knobs: dict[str, int]) -> tuple[bool, float, float]:
        rt = measure(knobs, "tune")
        rv = measure(knobs, "validate") if rt >= tune_target or knobs is rungs[-1] else 0.0
        return rt >= tune_target and rv >= target, rt, rv

    if len(rungs) > 1:
        probe = measure(rungs[-1], "probe")
        if probe < target - 0.02:  # hopeless: report the probe, skip the climb
            return TuneReport(False, rungs[-1], probe, probe, max(1, half // 5), steps)
    for knobs in rungs:
        ok, rt, rv = passes(knobs)
        if not ok:
            continue
        for kf in kfs[1:]:  # smallest re-ranking factor that still meets the target
            smaller = dict(knobs, k_factor=kf)
            ok, srt, srv = passes(smaller)
            if not ok:
                break
            knobs, rt, rv = smaller, srt, srv
        apply_knobs(index, knobs)
        return TuneReport(True, knobs, rv, rt, len(queries), steps)
    return TuneReport(False, rungs[-1], rv, rt, len(queries), steps)


def missed_target(
    report: TuneReport, what: str, target_recall: float, on_miss: str, hint: str
) -> tuple[str, dict]:
    """The warning text and the info["fallback"] record for a tuned index below its target;
    raises SearchError (with ``hint``) when ``on_miss`` is 'raise'."""
    msg = (
        f"{what} reached recall@10 {report.recall:.3f} < target {target_recall} at its largest "
        f"knobs {report.knobs}"
    )
    if on_miss == "raise":
        raise SearchError(f"{msg}; {hint}")
    record = {"recall_at_10": report.recall, "knobs": report.knobs, "action": on_miss}
    return msg, record
