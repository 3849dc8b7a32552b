"""Indexes larger than RAM: an IVF whose inverted lists live in a file, built from chunked rows.

Holds:

- :class:`~gradindex.store.vectors.ChunkedRows` (from :mod:`gradindex.store.vectors`) -- the rows of an HDF5
  dataset (or memmap, or array) read a chunk at a time, never the whole matrix at once.
- :func:`exact_topk` (from :mod:`gradindex.search.exact`) -- exact top-k over such rows, chunk
  by chunk.
- :func:`build_ondisk` -- for a dataset that may not fit in RAM: train an IVF's coarse quantizer
  on a sample of rows, add the rows chunk by chunk into partial IVF indexes written to disk,
  merge their lists into one ``.ivfdata`` file (as ``faiss.contrib.ondisk.merge_ondisk``), tune and
  validate ``nprobe`` against exact search computed chunk by chunk (``tuning.tune``), write
  the index and return it opened, memory-mapped.
- :func:`read_ondisk` (from :mod:`gradindex.search.ondisk_io`) -- open such an index with its
  lists memory-mapped, wherever its folder is.
- :func:`wants_ondisk` / :func:`build_from_store` -- when an index goes on disk (``"ondisk"``
  asked for, or ``"auto"`` when the rows would take more than half the available memory), and the
  one call build / merge / add use to make a method's index from the vector store.

Files, for ``path = tracin.faiss``::

    tracin.faiss            the IVF: quantizer [nlist, D], list sizes and offsets, tuned nprobe
    tracin.faiss.ivfdata    the lists: every row (float32) and its row number, list after list
    tracin.faiss.json       sidecar: kind "ondisk", knobs, recall, the .ivfdata name and size

The FAISS file names its lists file without a folder, so the folder can be moved; plain FAISS
opens it with ``faiss.read_index("tracin.faiss", faiss.IO_FLAG_ONDISK_SAME_DIR)``.

Memory while building: the training sample (max(10 000, 40 * nlist) rows), one partial index
(``part_rows``, 256 MiB of rows by default), one chunk and the 1000 held-out queries. While
searching: the quantizer and the list table; the OS pages list data in from the file. The
answers are those of the in-RAM IVF with the same quantizer and nprobe (the lists hold the same
rows in the same order), and exact search scans the lists in chunks.

An interrupted build leaves nothing that opens: the lists and the FAISS file are written in a
hidden working folder ``.tracin.faiss.parts`` and moved into place only after tuning; the
sidecar, without which no index loads, is removed before that and written last.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from gradindex.errors import IndexStateError, SearchError
from gradindex.search import tuning as st
from gradindex.search.exact import exact_topk
from gradindex.search.faiss_common import (
    check_build_args,
    check_common_norm,
    configure,
    first_line,
    restores_threads,
    sidecar_dict,
    write_failure,
)
from gradindex.search.faiss_index import VectorIndex
from gradindex.search.ondisk_io import (
    IVFDATA_SUFFIX,
    PREFETCH_THREADS,
    fsync,
    read_ondisk,
    stdout_to_stderr,
)
from gradindex.store.layout import write_json_atomic
from gradindex.store.vectors import ChunkedRows

logger = logging.getLogger(__name__)

ONDISK = "ondisk"
PART_BYTES = 256 << 20
"""Rows per partial index before it is written to disk: 256 MiB of float32 rows + ids."""
AUTO_ONDISK_FRACTION = 0.5
"""``auto`` builds on disk when the float32 rows take more than this share of available memory."""
__all__ = ["build_ondisk", "build_from_store", "exact_topk", "read_ondisk", "wants_ondisk"]


def build_ondisk(
    rows: ChunkedRows | np.ndarray,
    path: str | os.PathLike[str],
    method: str,
    target_recall: float = 0.95,
    seed: int = 0,
    *,
    nlist: int | None = None,
    on_miss: str = "fallback",
    tune_queries: np.ndarray | None = None,
    part_rows: int | None = None,
) -> VectorIndex:
    """Build an on-disk IVF over ``rows`` [N, D] at ``path`` (+ ``.ivfdata``, ``.json``).

    For rows that may not fit in RAM: pass a :class:`ChunkedRows` over an HDF5 dataset (an array
    is wrapped in one). nlist: the number of lists (default ``tuning.factory_for``, about
    4 sqrt(N)). ``nprobe`` is tuned until recall@10 against exact search reaches
    ``target_recall`` on held-out queries, as for the in-RAM kinds; if no nprobe within budget
    does, ``on_miss`` decides: ``fallback`` warns and probes every list (exact, as slow as a
    flat scan), ``warn`` keeps the best and warns, ``raise`` raises SearchError. part_rows: rows
    per partial index held in RAM before it goes to disk (default 256 MiB of rows).
    Returns the index opened from disk (lists memory-mapped).
    """
    src = rows if isinstance(rows, ChunkedRows) else ChunkedRows(rows)
    return _build(
        src,
        Path(path),
        method,
        target_recall,
        seed,
        nlist,
        on_miss,
        tune_queries,
        part_rows,
        ONDISK,
    )


@restores_threads
def _build(
    src: ChunkedRows,
    path: Path,
    method: str,
    target_recall: float,
    seed: int,
    nlist: int | None,
    on_miss: str,
    tune_queries: np.ndarray | None,
    part_rows: int | None,
    requested: str,
) -> VectorIndex:
    check_build_args(method, on_miss, target_recall, seed)
    n, d = src.shape
    _check_lists(n, nlist)
    part_rows = part_rows or max(src.chunk_rows, PART_BYTES // (4 * d + 8))
    if not path.parent.is_dir():
        raise IndexStateError(f"{path.parent}: no such folder for the on-disk index")
    threads = configure(d)
    t0 = time.perf_counter()
    factory = st.factory_for("ivf", n) if nlist is None else f"IVF{nlist},Flat"
    work = path.parent / f".{path.name}.parts"  # hidden; removed whatever happens
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    index = None
    try:
        trained = _trained(src, factory, int(seed))
        parts = _fill_parts(src, trained, work, part_rows, method)
        lists = work / "lists.ivfdata"
        index = _merge_parts(trained, parts, lists)
        for p in parts:
            p.unlink()
        info = _tuned(
            index, src, method, requested, target_recall, seed, factory, on_miss, tune_queries
        )
        data = path.with_name(path.name + IVFDATA_SUFFIX)
        nlists = int(faiss.extract_index_ivf(index).nlist)
        lists_file = faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists)
        lists_file.filename = data.name  # no folder: movable
        faiss.write_index(index, str(work / "index.faiss"))
        index = lists_file = None  # unmaps the lists, flushing them
        fsync(lists)
        info["ondisk"] = {
            "ivfdata": data.name,
            "bytes": lists.stat().st_size,
            "nlist": nlists,
            "train_rows": min(n, max(40 * nlists, 10_000)),
            "partial_indexes": len(parts),
            "chunk_rows": src.chunk_rows,
        }
        info.update(build_seconds=round(time.perf_counter() - t0, 3), threads=threads)
        _commit(path, work / "index.faiss", lists, data, info)
    except (OSError, RuntimeError) as e:
        failure = write_failure(path, e)
        if failure is not None:
            raise failure from None
        raise IndexStateError(
            f"cannot build the on-disk index at {path}: {first_line(e)}"
        ) from None
    finally:
        index = None
        shutil.rmtree(work, ignore_errors=True)
    logger.info("built on-disk %s over %dx%d: %s", factory, n, d, info["knobs"])
    return VectorIndex.load(path)


def _check_lists(n: int, nlist: int | None) -> None:
    """Refuse no rows, or a list count that is no positive integer or above the rows."""
    if n == 0:
        raise SearchError("vectors are empty (0 rows); an index needs at least one row")
    if nlist is not None and (isinstance(nlist, bool) or not isinstance(nlist, int) or nlist < 1):
        raise SearchError(f"nlist must be a positive integer; got {nlist!r}")
    if nlist is not None and nlist > n:
        raise SearchError(f"nlist={nlist} is more than the {n} rows; use at most {n} lists")


def _commit(path: Path, faiss_file: Path, lists: Path, data: Path, info: dict[str, Any]) -> None:
    """Move the built files into place: no sidecar while the two data files change, the
    sidecar (without which no index loads) last."""
    Path(str(path) + ".json").unlink(missing_ok=True)
    os.replace(lists, data)
    os.replace(faiss_file, path)
    write_json_atomic(Path(str(path) + ".json"), sidecar_dict(info))


def _trained(src: ChunkedRows, factory: str, seed: int) -> faiss.Index:
    """An empty inner-product IVF whose quantizer is trained on a sample of ``src``."""
    index = faiss.index_factory(src.dim, factory, faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.extract_index_ivf(index)
    ivf.cp.seed = seed
    rows = st.training_rows(src.n, ivf.nlist, seed)
    sample = src[np.arange(src.n) if rows is None else rows]  # [m, D]
    index.train(sample)
    return index


def _fill_parts(
    src: ChunkedRows, trained: faiss.Index, work: Path, part_rows: int, method: str
) -> list[Path]:
    """Add the rows chunk by chunk (ids = row numbers) into partial indexes written to ``work``
    (ReTrac rows checked to share one norm, as ``VectorIndex.build`` does)."""
    parts: list[Path] = []
    part = None
    span = [np.inf, 0.0]  # smallest and largest row norm seen
    for start, block in src.chunks():
        if method == "retrac":
            norms = np.linalg.norm(block, axis=1)
            span = [min(span[0], float(norms.min())), max(span[1], float(norms.max()))]
            check_common_norm(np.asarray(span))
        if part is None:
            part = faiss.clone_index(trained)
        part.add_with_ids(block, np.arange(start, start + len(block), dtype=np.int64))
        if part.ntotal >= part_rows:
            parts.append(work / f"part{len(parts):05d}.faiss")
            faiss.write_index(part, str(parts[-1]))
            part = None
    if part is not None:
        parts.append(work / f"part{len(parts):05d}.faiss")
        faiss.write_index(part, str(parts[-1]))
    return parts


def _merge_parts(trained: faiss.Index, parts: list[Path], lists: Path) -> faiss.Index:
    """A copy of ``trained`` holding the lists of every partial index, merged list by list into
    one on-disk file (as ``faiss.contrib.ondisk.merge_ondisk``, but freeing the partial indexes,
    memory-mapped, once merged). Within a list, rows keep their order."""
    index = faiss.clone_index(trained)
    ivf = faiss.extract_index_ivf(index)
    sources = [faiss.read_index(str(p), faiss.IO_FLAG_MMAP) for p in parts]
    vec = faiss.InvertedListsPtrVector()
    for s in sources:
        vec.push_back(faiss.extract_index_ivf(s).invlists)
    merged = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(lists))
    merged.prefetch_nthread = PREFETCH_THREADS  # for the tuning searches
    with stdout_to_stderr():  # FAISS prints "resizing ..." with printf
        ntotal = merged.merge_from_multiple(vec.data(), vec.size(), False)
    index.ntotal = ivf.ntotal = ntotal
    ivf.replace_invlists(merged, True)
    merged.this.disown()  # the index owns and frees it
    del vec, sources
    logger.info("merged %d partial index(es), %d rows, into %s", len(parts), ntotal, lists)
    return index


def _tuned(
    index: faiss.Index,
    src: ChunkedRows,
    method: str,
    requested: str,
    target_recall: float,
    seed: int,
    factory: str,
    on_miss: str,
    tune_queries: np.ndarray | None,
) -> dict[str, Any]:
    """Tune nprobe against exact search (computed chunk by chunk) and act on a missed target as
    ``on_miss`` says; returns the index's info record."""
    n, d = src.shape
    q = (
        st.heldout_queries(src, st.HELDOUT_QUERIES, int(seed) + 1)
        if tune_queries is None
        else _queries(tune_queries, d)
    )
    if len(q) < 2:
        raise SearchError("tune_queries needs at least 2 rows (split to tune / validate)")
    exact, _ = exact_topk(src, q, min(st.RECALL_K, n))
    report = st.tune(index, src, float(target_recall), q, exact_scores=exact)
    info = _info(method, requested, target_recall, seed, n, d, factory, report, tune_queries)
    if report.met:
        return info
    msg, record = st.missed_target(
        report,
        f"on-disk index {factory!r}",
        target_recall,
        on_miss,
        "use a lower target_recall or more lists (nlist)",
    )
    info["fallback"] = {"from": factory, **record}
    if on_miss == "fallback":
        warnings.warn(msg + "; probing every list instead (exact search)", stacklevel=4)
        nlist = int(faiss.extract_index_ivf(index).nlist)
        info.update(knobs={"nprobe": nlist}, recall_at_10=1.0, meets_target=True)
        info["recall_measured_on"] = "exact by construction (every list probed)"
        st.apply_knobs(index, info["knobs"])
    else:
        warnings.warn(msg + "; kept it as asked (on_miss='warn')", stacklevel=4)
    return info


def _queries(q: Any, d: int) -> np.ndarray:
    arr = np.ascontiguousarray(np.asarray(q), dtype=np.float32)
    if arr.ndim != 2 or arr.shape[1] != d or not np.isfinite(arr).all():
        raise SearchError(f"tune_queries must be a finite float matrix [M, {d}]")
    return arr


def _info(
    method: str,
    requested: str,
    target_recall: float,
    seed: int,
    n: int,
    d: int,
    factory: str,
    report: st.TuneReport,
    tune_queries: np.ndarray | None,
) -> dict[str, Any]:
    given = "given" if tune_queries is not None else "perturbed-row"
    return {
        "method": method,
        "requested_kind": requested,
        "target_recall": float(target_recall),
        "seed": int(seed),
        "n": n,
        "dim": d,
        "fallback": None,
        "kind": ONDISK,
        "factory": factory,
        "knobs": report.knobs,
        "recall_at_10": report.recall,
        "tune_recall_at_10": report.tune_recall,
        "recall_measured_on": f"{report.n_queries} {given} queries (knobs chosen on one half, "
        "recall_at_10 on the other)",
        "meets_target": report.met,
        "ladder": report.steps,
    }


def wants_ondisk(kind: str, n: int, d: int) -> bool:
    """True for ``"ondisk"``, and for ``"auto"`` when N x D float32 rows would take more than
    AUTO_ONDISK_FRACTION of the available memory (an in-RAM build has to hold them all)."""
    if kind == ONDISK:
        return True
    if kind != "auto":
        return False
    avail = st.available_memory()
    big = avail is not None and n * d * 4 > AUTO_ONDISK_FRACTION * avail
    if big:
        logger.info("auto: %dx%d rows exceed half the available memory; building on disk", n, d)
    return big


def build_from_store(
    store: Any,
    method: str,
    rows: np.ndarray | None,
    kind: str,
    target_recall: float,
    path: Path,
) -> dict[str, Any]:
    """Build and save ``method``'s index over the store rows ``rows`` (None: all) at ``path``:
    in RAM, or on disk (read from the store in chunks) when :func:`wants_ondisk`. Returns its
    info. ``store`` is an open :class:`gradindex.store.vectors.VectorStore`."""
    n = store.num_rows if rows is None else len(rows)
    if wants_ondisk(kind, n, store.dim):
        src = ChunkedRows(store.file[method], rows)
        info = _build(src, path, method, target_recall, 0, None, "fallback", None, None, kind).info
    else:
        vindex = VectorIndex.build(store.vectors(method, rows), method, kind, target_recall)
        vindex.save(path)
        info = vindex.info
    if store.build_id is None:
        return info
    _stamp_build_id(path, store.build_id)
    return {**info, "build_id": store.build_id}


def _stamp_build_id(path: Path, build_id: str) -> None:
    """Record the store's build id in the index's sidecar: opening the folder checks it, so
    a FAISS file of another build is refused."""
    side_path = Path(str(path) + ".json")
    side = json.loads(side_path.read_text())
    side["info"]["build_id"] = build_id
    write_json_atomic(side_path, side)
