"""Vector indexes for attribution search: exact and approximate, validated, saved as plain FAISS.

Holds :class:`VectorIndex`: ``build`` / ``search`` / ``save`` / ``load`` / ``info`` over one
float32 matrix, for ``tracin`` (maximum inner product search over rows of very different norms)
or ``retrac`` (rows of one common norm, so inner product ranks as cosine; unequal norms refused).

Scores are inner products of the vectors as given (no MIPS->L2 extra coordinate: it wrecks
IVF/HNSW recall on heavy-tailed norms). Approximate kinds are tuned against exact search at
build time (:mod:`gradindex.search.tuning`).

Exact search (``kind="flat"`` or ``exact=True``) runs over the original float32 rows, with no
second copy: flat and HNSW keep them in a flat storage (``flat_rows``); IVF in its lists, scanned
in bounded chunks; lossy codes (PQ/SQ/...) are wrapped in an exact re-ranking stage.

Indexes larger than RAM (``kind="ondisk"``: an IVF whose lists live in a memory-mapped
``.ivfdata`` file) are built by :mod:`gradindex.search.ondisk`, opened by ``ondisk_io`` and
searched by ``ondisk_search`` (resident memory bounded). Threads and FAISS's BLAS threshold:
:mod:`gradindex.search.faiss_common` (``set_num_threads`` / ``batch_threads`` importable here).

Every ``VectorIndex`` is a :class:`~gradindex.search.backend.SearchBackend` over the rows of the
matrix it was built over (in an index folder: the unflagged store rows, in order).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import time
import warnings
from typing import Any

import faiss
import numpy as np

from gradindex.errors import IndexStateError, SearchError
from gradindex.search import tuning as st
from gradindex.search.backend import SearchBackend, SearchResult, as_matrix
from gradindex.search.exact import exact_search_ivf, flat_storage
from gradindex.search.faiss_common import (
    FORMAT_VERSION,
    METHODS,
    ON_MISS,
    batch_threads,
    check_build_args,
    check_common_norm,
    configure,
    first_line,
    restores_threads,
    set_num_threads,
    sidecar_dict,
    write_failure,
)
from gradindex.search.gpu import GPU_MAX_K, clone_to_gpus
from gradindex.search.ondisk_io import read_ondisk, release_pages
from gradindex.search.ondisk_search import search_bounded

__all__ = [
    "INDEX_KINDS",
    "METHODS",
    "ON_MISS",
    "SearchResult",
    "VectorIndex",
    "batch_threads",
    "set_num_threads",
]

logger = logging.getLogger(__name__)

INDEX_KINDS = ("flat", "ivf", "hnsw", "auto")  # or any FAISS factory string
QUERY_BATCH = 4096  # queries per FAISS call (its own BLAS query block is 4096)
_CHUNK_BYTES = 64 << 20  # row chunk for exact search over IVF lists


class VectorIndex(SearchBackend):
    """Top-k inner-product search over one float32 matrix, exact or approximate-but-validated."""

    def __init__(self, index: faiss.Index, info: dict[str, Any]) -> None:
        """Wrap a built FAISS index; use :meth:`build` or :meth:`load` instead."""
        self._index = index
        self._info = info
        self.ntotal: int = int(index.ntotal)
        self.dim: int = int(index.d)
        self.metric: int = int(index.metric_type)  # faiss.METRIC_INNER_PRODUCT for every build
        self.method: str = info["method"]
        self._flat = flat_storage(index)  # IndexFlat over all rows, or None (IVF)
        self._gpu: faiss.Index | None = None  # a GPU clone of _index, see to_gpu

    @property
    def num_rows(self) -> int:
        return self.ntotal

    @classmethod
    @restores_threads
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
        check_build_args(method, on_miss, target_recall, seed)
        _check_kind_arg(kind)
        seed = int(seed)
        x = as_matrix(vectors, "vectors")
        n, d = x.shape
        if n == 0:
            raise SearchError("vectors are empty (0 rows); an index needs at least one row")
        if method == "retrac":
            check_common_norm(np.linalg.norm(x, axis=1))
        threads = configure(d)
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
            index, factory, chosen, report = _tuned(x, chosen, info, on_miss, tune_queries)
        info.update(_tune_record(chosen, factory, report, tune_queries is not None))
        info.update(build_seconds=round(time.perf_counter() - t0, 3), threads=threads)
        logger.info("built %s over %dx%d: %s", factory, n, d, info["knobs"])
        return cls(index, info)

    def to_gpu(self, num_gpus: int | None = None) -> bool:
        """Answer searches from a copy of the index on the GPU(s) (rows sharded across them).

        Needs faiss-gpu (``pip install "gradindex[gpu]"``) and a CUDA device; flat and IVF kinds
        only (FAISS has no GPU HNSW). Otherwise it warns why and keeps searching on the CPU, so
        callers can ask unconditionally. Exact search over IVF lists and k above FAISS's GPU
        limit stay on the CPU. Returns whether searches now run on the GPU.
        """
        self._gpu, reason = clone_to_gpus(self._index, num_gpus)
        if reason is not None:
            warnings.warn(f"{self.method} search stays on the CPU: {reason}", stacklevel=2)
        self._info["search_device"] = "cpu" if self._gpu is None else "gpu"
        return self._gpu is not None

    @restores_threads
    def search_rows(self, q: np.ndarray, k: int, exact: bool = False) -> SearchResult:
        """Top-k rows by inner product for each checked query [B, D]; batches of any size.

        ``exact=True`` scans every stored float32 row. Approximate results run at the knobs tuned
        at build time (validated for k=10); a query for which the index returns fewer than k rows
        is answered by exact search instead, so every result row holds k valid rows.
        """
        b = len(q)
        configure(self.dim, single_query=b == 1)
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
                sc, rw = self._approximate(qb, k, on_gpu)
                short = np.flatnonzero((rw < 0).any(axis=1))
                if short.size:
                    sc[short], rw[short] = self._exact_search(qb[short], k)
            scores[i0 : i0 + len(qb)], rows[i0 : i0 + len(qb)] = sc, rw
        order = np.lexsort((rows, -scores), axis=-1)  # best first, ties by row number
        scores = np.take_along_axis(scores, order, axis=1)
        rows = np.take_along_axis(rows, order, axis=1)
        return SearchResult(scores=scores, ids=rows.copy(), rows=rows)

    def flat_rows(self) -> np.ndarray | None:
        """Every row, float32 [ntotal, dim]: a view of the flat storage in RAM (no copy; valid
        while this index lives), or None where the index keeps none (IVF lists, on disk)."""
        flat = None if self._flat is None else faiss.downcast_index(self._flat)
        if not isinstance(flat, faiss.IndexFlat) or self.ntotal == 0:
            return None
        view = faiss.rev_swig_ptr(flat.get_xb(), self.ntotal * self.dim)
        return np.asarray(view).view(np.float32).reshape(self.ntotal, self.dim)

    def sample_rows(self, count: int = 3) -> tuple[np.ndarray, np.ndarray] | None:
        """A few stored rows as (row numbers [m], float32 rows [m, D]), read cheaply (flat
        storage, or the first non-empty IVF list), to check the index holds the rows it should;
        None when it keeps no float32 copy of them (lossy codes only)."""
        if self.ntotal == 0:
            return None
        if (flat := self.flat_rows()) is not None:
            rows = np.unique(np.linspace(0, self.ntotal - 1, count).astype(np.int64))
            return rows, flat[rows]
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

    def _approximate(self, q: np.ndarray, k: int, on_gpu: bool) -> tuple[np.ndarray, np.ndarray]:
        """Top-k at the tuned knobs; an on-disk index's lists probed with resident memory
        bounded (``ondisk_search``)."""
        if on_gpu:
            return self._gpu.search(q, k)
        if self._info.get("kind") == "ondisk":
            return search_bounded(self._index, q, k)
        return self._index.search(q, k)

    def _exact_search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k over the stored float32 rows (flat storage, or IVF lists in chunks; an
        on-disk index's pages unmapped after each chunk)."""
        if self._flat is not None:
            return self._flat.search(q, k)
        ondisk = self._info.get("kind") == "ondisk"
        release = functools.partial(release_pages, self._index) if ondisk else None
        return exact_search_ivf(self._index, q, k, _CHUNK_BYTES, release)

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
        side = sidecar_dict(self._info)
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
            failure = write_failure(path, e)
            if failure is not None:
                raise failure from None
            raise IndexStateError(f"cannot write index to {path}: {first_line(e)}") from None

    @classmethod
    def load(cls, path: str | os.PathLike, mmap: bool = False) -> VectorIndex:
        """Open an index written by :meth:`save`; ``mmap=True`` maps its rows instead of reading.

        mmap uses ``faiss.IO_FLAG_MMAP_IFC``: plain ``IO_FLAG_MMAP`` maps only IVF lists and
        still reads flat / HNSW storage into memory, while ``_IFC`` maps all of them.
        An on-disk index (kind ``ondisk``) is always memory-mapped from its ``.ivfdata`` file,
        found next to ``path`` wherever the folder was moved (:func:`gradindex.search.ondisk.read_ondisk`).
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
                index, mmap = read_ondisk(path, info), True
            else:
                index = faiss.read_index(path, flag)
        except RuntimeError as e:
            raise IndexStateError(f"cannot read FAISS index {path}: {first_line(e)}") from None
        if index.ntotal != info["n"] or index.d != info["dim"]:
            raise IndexStateError(
                f"{path} holds {index.ntotal}x{index.d} vectors but its sidecar says "
                f"{info['n']}x{info['dim']}; the two files do not belong together"
            )
        st.apply_knobs(index, info.get("knobs") or {})
        info["mmap"] = bool(mmap)
        return cls(index, info)


def _flat_index(x: np.ndarray) -> faiss.Index:
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    return index


def _check_kind_arg(kind: Any) -> None:
    """Refuse a kind that is no string, and ``ondisk``, which is built elsewhere."""
    if not isinstance(kind, str) or not kind.strip():
        raise SearchError(f"kind must be one of {INDEX_KINDS} or a FAISS factory string")
    if kind == "ondisk":
        raise SearchError(
            "kind 'ondisk' is built from rows read in chunks into a folder: use "
            "gradindex.search.ondisk.build_ondisk(rows, path, method) or build_index(index='ondisk')"
        )


def _tuned(
    x: np.ndarray,
    chosen: str,
    info: dict[str, Any],
    on_miss: str,
    tune_queries: np.ndarray | None,
) -> tuple[faiss.Index, str, str, st.TuneReport]:
    """An approximate index of kind ``chosen`` over ``x``, its knobs tuned to info's target
    recall; on a miss, what ``on_miss`` says (recorded in ``info["fallback"]``). Returns the
    index, its factory string, the kind built and the tuning report."""
    n, d = x.shape
    target_recall, seed = info["target_recall"], info["seed"]
    factory = st.factory_for(chosen, n) if chosen in ("ivf", "hnsw") else chosen
    q = (
        st.heldout_queries(x, st.HELDOUT_QUERIES, seed + 1)
        if tune_queries is None
        else as_matrix(tune_queries, "tune_queries", d)
    )
    if len(q) < 2:
        raise SearchError("tune_queries needs at least 2 rows (split to tune / validate)")
    index, factory = st.make_index(factory, x, seed)
    report = st.tune(index, x, target_recall, q)
    if report.met:
        return index, factory, chosen, report
    msg, record = st.missed_target(
        report,
        f"index {factory!r}",
        target_recall,
        on_miss,
        "use kind='flat' or a lower target_recall",
    )
    info["fallback"] = {"from": factory, **record}
    if on_miss == "fallback":
        warnings.warn(msg + "; built exact flat search instead", stacklevel=4)
        return _flat_index(x), "Flat", "flat", report
    warnings.warn(msg + "; kept it as asked (on_miss='warn')", stacklevel=4)
    return index, factory, chosen, report


def _tune_record(
    chosen: str, factory: str, report: st.TuneReport | None, given: bool
) -> dict[str, Any]:
    """The info entries that describe the kind built and the recall it was measured at."""
    flat = chosen == "flat"
    return {
        "kind": chosen if chosen in INDEX_KINDS else "factory",
        "factory": factory,
        "knobs": report.knobs if report and not flat else {},
        "recall_at_10": 1.0 if flat else report.recall,
        "tune_recall_at_10": 1.0 if flat else report.tune_recall,
        "recall_measured_on": (
            "exact by construction"
            if flat
            else f"{report.n_queries} {'given' if given else 'perturbed-row'}"
            " queries (knobs chosen on one half, recall_at_10 on the other)"
        ),
        "meets_target": flat or report.met,
        "ladder": report.steps if report else [],
    }
