"""Vector indexes for attribution search: exact and approximate, validated, saved as plain FAISS.

Holds:

- ``METHODS``, ``INDEX_KINDS`` -- the accepted method and kind names.
- :class:`SearchResult` -- scores, ids and row numbers of a search, best first.
- :class:`VectorIndex` -- ``build`` / ``search`` / ``save`` / ``load`` / ``info`` over one
  float32 matrix, for ``tracin`` (maximum inner product search over rows of very different
  norms) or ``retrac`` (rows of one common norm, so inner product ranks as cosine; rows of
  unequal norms are refused, see ``check_common_norm``).
- :func:`set_num_threads`, :func:`batch_threads` -- the FAISS thread count batches use.

Scores are always inner products of the vectors as given: nothing is rescaled, and the MIPS->L2
extra-coordinate trick is not used (measured to wreck IVF/HNSW recall on heavy-tailed norms).
Approximate kinds are tuned and validated against exact search at build time
(:mod:`gradindex.index.tuning`).

Exact search (``kind="flat"`` or ``exact=True``) always runs over the original float32 rows:
flat and HNSW keep them in a flat storage searched directly; IVF keeps them in its lists, which
are scanned list by list in bounded chunks (in RAM or memory-mapped on disk); lossy codes
(factory strings with PQ/SQ/...) are wrapped in an exact re-ranking stage that keeps them. So
``exact=True`` costs no second copy of the matrix.

Indexes larger than RAM (``kind="ondisk"``: an IVF whose lists live in a ``.ivfdata`` file next
to the FAISS file, memory-mapped) are built from chunked rows by :mod:`gradindex.index.ondisk`, and
opened and searched here like any other kind.

Threads: a single query runs on one thread; batches use the caller's thread count by default:
the OpenMP / torch thread setting of the calling thread, capped by the CPUs the process may use
(``set_num_threads`` or the environment variable ``GRADINDEX_NUM_THREADS`` changes that). The
FAISS wheel and torch share one OpenMP runtime when torch is imported first, so a FAISS thread
setting is a torch thread setting: every build and search restores the caller's count when it
returns (OpenMP keeps the count per calling thread, so other Python threads are untouched). IVF
and HNSW answer one query on one thread anyway (FAISS parallelizes over queries); a flat index
would split its scan over threads, but with the cores shared by other jobs the OpenMP barriers
stall: measured here, one query over 30k x 64 took 0.66 ms on one thread and 32 ms on two, and
one over 100k x 512 took 50 ms vs 136 ms. Batches amortize the barriers over many queries.

Batches: FAISS >= 1.14.2 scans the whole database once per query when ``n_queries * D`` is below
``faiss.cvar.distance_compute_blas_threshold`` (128000 by default: 64 queries at D=256 took
10x longer than one BLAS pass here). Every search sets the threshold to ``4 * D`` so batches of
four or more queries take the blocked BLAS path (measured: 1-3 queries are as fast either way).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import operator
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from typing import Any, TypeVar

import faiss
import numpy as np

from gradindex.errors import IndexStateError, SearchError
from gradindex.index import tuning as st
from gradindex.inputs.threads import available_cpus

logger = logging.getLogger(__name__)

METHODS = ("tracin", "retrac")
INDEX_KINDS = ("flat", "ivf", "hnsw", "auto")  # or any FAISS factory string
ON_MISS = ("fallback", "warn", "raise")
FORMAT_VERSION = 1
QUERY_BATCH = 4096  # queries per FAISS call (its own BLAS query block is 4096)
GPU_MAX_K = 2048  # FAISS GPU k-selection handles k up to this
BLAS_MIN_QUERIES = 4  # batches this large or larger take FAISS's BLAS path
_CHUNK_BYTES = 64 << 20  # row chunk for exact search over IVF lists
_num_threads: int | None = None

_F = TypeVar("_F", bound=Callable[..., Any])


def set_num_threads(n: int | None = None) -> int:
    """Set the FAISS threads for batches (None: ``GRADINDEX_NUM_THREADS`` or the caller's count).

    Single queries always run on one thread (see the module docstring). Applies to later builds
    and searches only, never to the caller's torch / OpenMP threads. Returns the batch count.
    """
    global _num_threads
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise SearchError(f"thread count must be a positive integer; got {n!r}")
    _num_threads = n
    return batch_threads()


def batch_threads() -> int:
    """FAISS threads for a batch: set_num_threads, else GRADINDEX_NUM_THREADS, else the caller's
    own count (its OpenMP setting and torch's, when torch is loaded) capped by the usable CPUs."""
    if _num_threads is not None:
        return _num_threads
    env = os.environ.get("GRADINDEX_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    n = min(faiss.omp_get_max_threads(), available_cpus())
    torch = sys.modules.get("torch")  # never imported here: the search layer does not need it
    if torch is not None and hasattr(torch, "get_num_threads"):
        n = min(n, torch.get_num_threads())
    return max(1, n)


def _restores_threads(fn: _F) -> _F:
    """Decorate a function that calls :func:`_configure`: the caller's OpenMP thread count (also
    torch's, when the runtime is shared) is put back when it returns or raises."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        before = faiss.omp_get_max_threads()
        try:
            return fn(*args, **kwargs)
        finally:
            faiss.omp_set_num_threads(before)

    return wrapper  # type: ignore[return-value]


def _configure(dim: int, single_query: bool = False) -> int:
    """Apply the thread and BLAS-threshold policy (module docstring); returns the batch threads.
    Only inside a function decorated with :func:`_restores_threads`."""
    n = batch_threads()
    faiss.omp_set_num_threads(1 if single_query else n)
    if dim:
        faiss.cvar.distance_compute_blas_threshold = BLAS_MIN_QUERIES * dim
    return n


@dataclass(frozen=True)
class SearchResult:
    """Search results, best first. ``scores, ids = result`` unpacks the two users need.

    scores [B, k] float32 inner products; ids [B, k] (row numbers here, sample ids once the
    attribution layer swaps them in); rows [B, k] int64 row numbers. Equal scores are ordered by
    row number (which of several rows tied at the k-th score makes the cut is FAISS's choice).
    resized: the query images' (H, W) when they were resized to the model's size, else None.
    """

    scores: np.ndarray
    ids: np.ndarray
    rows: np.ndarray
    resized: tuple[int, int] | None = None

    def __iter__(self):
        yield self.scores
        yield self.ids


def _as_matrix(a: Any, name: str, dim: int | None = None) -> np.ndarray:
    """A contiguous float32 [N, D] copy/view of ``a``, or SearchError saying what is wrong."""
    try:
        arr = np.asarray(a)
    except (TypeError, ValueError) as e:
        raise SearchError(f"{name} is not an array ({e}); pass a float32 matrix [N, D]") from None
    if arr.dtype.kind not in "biuf":
        raise SearchError(f"{name} has dtype {arr.dtype}; pass real numbers (float32)")
    if arr.ndim != 2:
        raise SearchError(
            f"{name} must be a 2-D array [N, D]; got shape {arr.shape} "
            "(a single vector v goes in as v[None, :])"
        )
    if arr.shape[1] == 0:
        raise SearchError(f"{name} have dimension 0; pass vectors with at least one coordinate")
    if dim is not None and arr.shape[1] != dim:
        raise SearchError(
            f"{name} have dimension {arr.shape[1]} but the index holds {dim}-dimensional "
            "vectors; embed them with the same spec and projection"
        )
    with np.errstate(over="ignore"):  # overflow to inf is reported just below
        arr = np.ascontiguousarray(arr, dtype=np.float32)
    finite = np.isfinite(arr).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise SearchError(
            f"{name} contain NaN or inf in {bad.size} row(s) (first: row {bad[0]}) after "
            "conversion to float32; fix or drop those rows"
        )
    return arr


class VectorIndex:
    """Top-k inner-product search over one float32 matrix, exact or approximate-but-validated."""

    def __init__(self, index: faiss.Index, info: dict[str, Any]) -> None:
        """Wrap a built FAISS index; use :meth:`build` or :meth:`load` instead."""
        self._index = index
        self._info = info
        self.ntotal: int = int(index.ntotal)
        self.dim: int = int(index.d)
        self.metric: int = int(index.metric_type)  # faiss.METRIC_INNER_PRODUCT for every build
        self.method: str = info["method"]
        self._flat = st.flat_storage(index)  # IndexFlat over all rows, or None (IVF)
        self._gpu: faiss.Index | None = None  # a GPU clone of _index, see to_gpu

    @classmethod
    @_restores_threads
    def build(
        cls,
        vectors: np.ndarray,
        method: str,
        kind: str = "auto",
        target_recall: float = 0.95,
        seed: int = 0,
        *,
        on_miss: str = "fallback",
        tune_queries: np.ndarray | None = None,
    ) -> VectorIndex:
        """Build an index over ``vectors`` [N, D] for ``method``; rows keep their order.

        kind: ``flat`` (exact), ``ivf``, ``hnsw``, ``auto`` (see ``tuning.choose_kind``)
        or a FAISS factory string. Every approximate index has its knob tuned until recall@10
        against exact search is >= target_recall on held-out queries (``tune_queries`` [M, D] if
        given, else perturbed rows). If no knob within budget reaches it, ``on_miss`` decides:
        ``fallback`` (default) warns and builds an exact flat index instead, ``warn`` keeps the
        best knobs and warns, ``raise`` raises SearchError. Results are in :attr:`info`.
        """
        if method not in METHODS:
            raise SearchError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
        if not isinstance(kind, str) or not kind.strip():
            raise SearchError(f"kind must be one of {INDEX_KINDS} or a FAISS factory string")
        if kind == "ondisk":
            raise SearchError(
                "kind 'ondisk' is built from rows read in chunks into a folder: use "
                "gradindex.index.ondisk.build_ondisk(rows, path, method) or build_index(index='ondisk')"
            )
        if on_miss not in ON_MISS:
            raise SearchError(f"unknown on_miss {on_miss!r}; use one of {', '.join(ON_MISS)}")
        if not isinstance(target_recall, int | float) or not 0 < target_recall <= 1:
            raise SearchError(f"target_recall must be in (0, 1]; got {target_recall!r}")
        if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
            raise SearchError(f"seed must be an integer; got {seed!r}")
        seed = int(seed)
        x = _as_matrix(vectors, "vectors")
        n, d = x.shape
        if n == 0:
            raise SearchError("vectors are empty (0 rows); an index needs at least one row")
        if method == "retrac":
            check_common_norm(np.linalg.norm(x, axis=1))
        threads = _configure(d)
        t0 = time.perf_counter()
        chosen = st.choose_kind(n, d) if kind == "auto" else kind
        info: dict[str, Any] = {
            "method": method,
            "requested_kind": kind,
            "target_recall": float(target_recall),
            "seed": seed,
            "n": n,
            "dim": d,
            "fallback": None,
        }
        if chosen == "flat":
            index, factory, report = _flat_index(x), "Flat", None
        else:
            factory = st.factory_for(chosen, n) if chosen in ("ivf", "hnsw") else chosen
            q = (
                st.heldout_queries(x, st.HELDOUT_QUERIES, seed + 1)
                if tune_queries is None
                else _as_matrix(tune_queries, "tune_queries", d)
            )
            if len(q) < 2:
                raise SearchError("tune_queries needs at least 2 rows (split to tune / validate)")
            index, factory = st.make_index(factory, x, seed)
            report = st.tune(index, x, float(target_recall), q)
            if not report.met:
                msg, record = st.missed_target(
                    report,
                    f"index {factory!r}",
                    target_recall,
                    on_miss,
                    "use kind='flat' or a lower target_recall",
                )
                info["fallback"] = {"from": factory, **record}
                if on_miss == "fallback":
                    warnings.warn(msg + "; built exact flat search instead", stacklevel=2)
                    index, factory, chosen = _flat_index(x), "Flat", "flat"
                else:
                    warnings.warn(msg + "; kept it as asked (on_miss='warn')", stacklevel=2)
        info.update(
            kind=chosen if chosen in INDEX_KINDS else "factory",
            factory=factory,
            knobs=report.knobs if report and chosen != "flat" else {},
            recall_at_10=1.0 if chosen == "flat" else report.recall,
            tune_recall_at_10=1.0 if chosen == "flat" else report.tune_recall,
            recall_measured_on=(
                "exact by construction"
                if chosen == "flat"
                else f"{report.n_queries} {'given' if tune_queries is not None else 'perturbed-row'}"
                " queries (knobs chosen on one half, recall_at_10 on the other)"
            ),
            meets_target=chosen == "flat" or report.met,
            ladder=report.steps if report else [],
            build_seconds=round(time.perf_counter() - t0, 3),
            threads=threads,
        )
        logger.info("built %s over %dx%d: %s", factory, n, d, info["knobs"])
        return cls(index, info)

    def to_gpu(self, num_gpus: int | None = None) -> bool:
        """Answer searches from a copy of the index on the GPU(s) (rows sharded across them).

        Needs faiss-gpu (``pip install "gradindex[gpu]"``) and a CUDA device; flat and IVF kinds
        only (FAISS has no GPU HNSW). Otherwise it warns why and keeps searching on the CPU, so
        callers can ask unconditionally. Exact search over IVF lists and k above FAISS's GPU
        limit stay on the CPU. Returns whether searches now run on the GPU.
        """
        reason = _gpu_unavailable(self._index)
        if reason is None:
            try:
                options = faiss.GpuMultipleClonerOptions()
                options.shard = True  # split the rows over the GPUs, not a copy on each
                self._gpu = faiss.index_cpu_to_all_gpus(
                    self._index, co=options, ngpu=num_gpus or -1
                )
            except (RuntimeError, AttributeError) as e:
                reason = f"cloning to the GPU failed ({st._first_line(e)})"
        if reason is not None:
            warnings.warn(f"{self.method} search stays on the CPU: {reason}", stacklevel=2)
        self._info["search_device"] = "cpu" if self._gpu is None else "gpu"
        return self._gpu is not None

    @_restores_threads
    def search(self, queries: np.ndarray, k: int, exact: bool = False) -> SearchResult:
        """Top-k rows by inner product for each query [B, D]; batches of any size.

        ``exact=True`` scans every stored float32 row. Approximate results run at the knobs tuned
        at build time (validated for k=10); a query for which the index returns fewer than k rows
        is answered by exact search instead, so every result row holds k valid rows.
        """
        q = _as_matrix(queries, "queries", self.dim)
        k = check_k(k, self.ntotal)
        b = len(q)
        _configure(self.dim, single_query=b == 1)
        scores = np.empty((b, k), dtype=np.float32)
        rows = np.empty((b, k), dtype=np.int64)
        use_exact = exact or self._flat is self._index
        # a GPU clone of a flat index is exact; one of an IVF index answers approximate searches
        on_gpu = (
            self._gpu is not None and k <= GPU_MAX_K and (self._flat is self._index or not exact)
        )
        for i0 in range(0, b, QUERY_BATCH):
            qb = q[i0 : i0 + QUERY_BATCH]
            if use_exact and not on_gpu:
                sc, rw = self._exact_search(qb, k)
            else:
                sc, rw = (self._gpu if on_gpu else self._index).search(qb, k)
                short = np.flatnonzero((rw < 0).any(axis=1))
                if short.size:
                    sc[short], rw[short] = self._exact_search(qb[short], k)
            scores[i0 : i0 + len(qb)], rows[i0 : i0 + len(qb)] = sc, rw
        order = np.lexsort((rows, -scores), axis=-1)  # best first, ties by row number
        scores = np.take_along_axis(scores, order, axis=1)
        rows = np.take_along_axis(rows, order, axis=1)
        return SearchResult(scores=scores, ids=rows.copy(), rows=rows)

    def sample_rows(self, count: int = 3) -> tuple[np.ndarray, np.ndarray] | None:
        """A few stored rows as (row numbers [m], float32 rows [m, D]), read cheaply (flat
        storage, or the first non-empty IVF list), to check the index holds the rows it should;
        None when it keeps no float32 copy of them (lossy codes only)."""
        if self.ntotal == 0:
            return None
        if self._flat is not None:
            rows = np.unique(np.linspace(0, self.ntotal - 1, count).astype(np.int64))
            return rows, np.stack([self._flat.reconstruct(int(r)) for r in rows])
        ivf = faiss.extract_index_ivf(self._index)
        if ivf.code_size != 4 * ivf.d:
            return None
        lists = ivf.invlists
        lst = next(i for i in range(ivf.nlist) if lists.list_size(i))
        m = min(count, lists.list_size(lst))
        cptr, iptr = lists.get_codes(lst), lists.get_ids(lst)
        try:
            ids = faiss.rev_swig_ptr(iptr, m).view(np.int64).copy()
            codes = faiss.rev_swig_ptr(cptr, m * ivf.code_size).view(np.float32)
            rows = codes.reshape(m, ivf.d).copy()
        finally:
            lists.release_codes(lst, cptr)
            lists.release_ids(lst, iptr)
        order = np.argsort(ids)
        return ids[order], rows[order]

    def _exact_search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k over the stored float32 rows (flat storage, or IVF lists in chunks)."""
        if self._flat is not None:
            return self._flat.search(q, k)
        return st.exact_search_ivf(self._index, q, k, _CHUNK_BYTES)

    @property
    def info(self) -> dict[str, Any]:
        """JSON-able: kind, factory, knobs, recall@10 measured at build, n, dim, method..."""
        return json.loads(json.dumps(self._info))

    def save(self, path: str | os.PathLike) -> None:
        """Write ``path`` (a FAISS file, knobs included) and ``path + '.json'`` (info), atomically.

        The FAISS file opens with plain ``faiss.read_index`` and searches at the tuned knobs.
        An on-disk index is written once, where it is built (its lists file sits next to it).
        """
        path = os.fspath(path)
        if self._info.get("kind") == "ondisk":
            raise SearchError(
                "an on-disk index is saved where it is built, next to its .ivfdata file; "
                "copy or move its folder instead"
            )
        side = _sidecar_dict(self._info)
        try:
            faiss.write_index(self._index, path + ".tmp")
            os.replace(path + ".tmp", path)
            with open(path + ".json.tmp", "w") as f:
                json.dump(side, f, indent=2, sort_keys=True)
                f.write("\n")
            os.replace(path + ".json.tmp", path + ".json")
        except (OSError, RuntimeError) as e:
            for tmp in (path + ".tmp", path + ".json.tmp"):  # no half-written file left behind
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            failure = st.write_failure(path, e)
            if failure is not None:
                raise failure from None
            raise IndexStateError(f"cannot write index to {path}: {st._first_line(e)}") from None

    @classmethod
    def load(cls, path: str | os.PathLike, mmap: bool = False) -> VectorIndex:
        """Open an index written by :meth:`save`; ``mmap=True`` maps its rows instead of reading.

        mmap uses ``faiss.IO_FLAG_MMAP_IFC``: measured here, plain ``IO_FLAG_MMAP`` maps only IVF
        lists and still reads flat / HNSW storage into memory, while ``_IFC`` maps all of them.
        An on-disk index (kind ``ondisk``) is always memory-mapped from its ``.ivfdata`` file,
        found next to ``path`` wherever the folder was moved (:func:`gradindex.index.ondisk.read_ondisk`).
        """
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise IndexStateError(f"no index file at {path}; build and save one first")
        try:
            with open(path + ".json") as f:
                side = json.load(f)
            info = side["info"]
            info["method"], info["n"], info["dim"]  # noqa: B018 - required keys
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise IndexStateError(
                f"missing or corrupt sidecar {path}.json ({type(e).__name__}: {e}); "
                "rebuild the index with VectorIndex.build(...).save(path)"
            ) from None
        if side.get("format") != FORMAT_VERSION:
            raise IndexStateError(
                f"{path}.json has format {side.get('format')!r}, this gradindex reads "
                f"{FORMAT_VERSION}; rebuild the index"
            )
        flag = getattr(faiss, "IO_FLAG_MMAP_IFC", faiss.IO_FLAG_MMAP) if mmap else 0
        try:
            if info.get("kind") == "ondisk":
                from gradindex.index.ondisk import read_ondisk

                index, mmap = read_ondisk(path, info), True
            else:
                index = faiss.read_index(path, flag)
        except RuntimeError as e:
            raise IndexStateError(f"cannot read FAISS index {path}: {st._first_line(e)}") from None
        if index.ntotal != info["n"] or index.d != info["dim"]:
            raise IndexStateError(
                f"{path} holds {index.ntotal}x{index.d} vectors but its sidecar says "
                f"{info['n']}x{info['dim']}; the two files do not belong together"
            )
        st.apply_knobs(index, info.get("knobs") or {})
        info["mmap"] = bool(mmap)
        return cls(index, info)


def check_common_norm(norms: np.ndarray, rtol: float = 1e-2) -> None:
    """ReTrac rows must share one norm, so that inner product ranks as cosine: refuse rows whose
    ``norms`` differ by more than ``rtol`` (float16 storage rounds norms by ~1e-3)."""
    lo, hi = float(np.min(norms)), float(np.max(norms))
    if not lo > 0 or hi > lo * (1 + rtol):
        raise SearchError(
            f"method 'retrac' ranks by cosine, which inner product gives only over rows of one "
            f"norm; these rows have norms from {lo:.4g} to {hi:.4g}: pass rows / their norms "
            "(x / np.linalg.norm(x, axis=1, keepdims=True)), or use method 'tracin' to rank "
            "by raw inner product"
        )


def check_k(k: Any, n: int) -> int:
    """k as a positive int, clamped (with a warning) to the ``n`` rows there are."""
    try:
        if isinstance(k, bool):
            raise TypeError
        k = operator.index(k)
    except TypeError:
        raise SearchError(f"k must be a positive integer; got {k!r}") from None
    if k <= 0:
        raise SearchError(f"k must be a positive integer; got {k}")
    if k > n:
        warnings.warn(f"k={k} is more than the {n} indexed rows; returning k={n}", stacklevel=3)
        k = n
    return k


def _gpu_unavailable(index: faiss.Index) -> str | None:
    """Why ``index`` cannot be searched on a GPU here, or None when it can."""
    base = faiss.downcast_index(
        index.index if isinstance(index, faiss.IndexPreTransform) else index
    )
    if not isinstance(base, faiss.IndexFlat | faiss.IndexIVF):
        return f"FAISS has no GPU version of {type(base).__name__} (build with kind flat or ivf)"
    if isinstance(base, faiss.IndexIVF) and isinstance(
        faiss.downcast_InvertedLists(base.invlists), faiss.OnDiskInvertedLists
    ):
        return "its inverted lists are on disk (memory-mapped), larger than a GPU copy should be"
    if not hasattr(faiss, "StandardGpuResources"):
        return 'this faiss has no GPU support (pip install "gradindex[gpu]" on a CUDA machine)'
    if faiss.get_num_gpus() == 0:
        return "faiss-gpu sees no CUDA device"
    return None


def _flat_index(x: np.ndarray) -> faiss.Index:
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    return index


def _sidecar_dict(info: dict[str, Any]) -> dict[str, Any]:
    try:
        version = metadata.version("gradindex")
    except metadata.PackageNotFoundError:
        version = "unknown"
    return {
        "class": "VectorIndex",
        "format": FORMAT_VERSION,
        "gradindex_version": version,
        "faiss_version": faiss.__version__,
        "info": {k: v for k, v in info.items() if k != "mmap"},
    }
