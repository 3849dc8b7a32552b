"""Exact search over the float32 rows an index keeps: no second copy of the matrix.

Holds:

- :func:`has_exact_rows` / :func:`flat_storage` -- whether an index keeps the float32 rows, and
  the IndexFlat holding them in row order (flat, HNSW, exact re-ranking stage).
- :func:`exact_search_ivf` -- exact top-k over the float32 rows in an IVF's lists, list by list
  (in RAM or memory-mapped on disk), in bounded chunks.
- :func:`exact_topk` -- exact top-k over rows read from a store a chunk at a time.
"""

from __future__ import annotations

from collections.abc import Callable

import faiss
import numpy as np

from gradindex.errors import SearchError
from gradindex.store.vectors import ChunkedRows


def has_exact_rows(index: faiss.Index) -> bool:
    """True when the index stores the float32 rows themselves (so exact search is possible)."""
    idx = faiss.downcast_index(index)
    return isinstance(idx, faiss.IndexFlat | faiss.IndexHNSWFlat | faiss.IndexIVFFlat) or (
        isinstance(idx, faiss.IndexRefine)
        and isinstance(faiss.downcast_index(idx.refine_index), faiss.IndexFlat)
    )


def flat_storage(index: faiss.Index) -> faiss.Index | None:
    """The IndexFlat holding every row in row order, if the index has one (IVF has not)."""
    idx = faiss.downcast_index(index)
    if isinstance(idx, faiss.IndexFlat):
        return index
    if isinstance(idx, faiss.IndexHNSWFlat):
        return faiss.downcast_index(idx.storage)
    if isinstance(idx, faiss.IndexRefine):
        ref = faiss.downcast_index(idx.refine_index)
        return ref if isinstance(ref, faiss.IndexFlat) else None
    return None


def exact_search_ivf(
    index: faiss.Index,
    q: np.ndarray,
    k: int,
    chunk_bytes: int,
    release: Callable[[], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product over the float32 rows stored in an IVF-Flat's lists.

    q [B, D]; returns (scores [B, k], ids [B, k]) of a result heap. Reads the lists one after the
    other (sequential pages when they are memory-mapped from disk), in pieces of at most
    ``chunk_bytes`` of rows, so memory stays bounded and each row is read once, whatever N.
    ``release``: called after each piece (a memory-mapped index unmaps the pages read).
    """
    ivf = faiss.extract_index_ivf(index)
    d = ivf.d
    if ivf.code_size != 4 * d:
        raise SearchError(f"exact search needs float32 rows in the IVF lists; got {ivf}")
    invlists = ivf.invlists
    limit = max(1024, chunk_bytes // (4 * d))
    heap = faiss.ResultHeap(len(q), k, keep_max=True)
    codes: list[np.ndarray] = []
    ids: list[np.ndarray] = []
    held = 0

    def flush() -> None:
        xb, ib = np.concatenate(codes), np.concatenate(ids)  # [m, D], [m]
        sc, pos = faiss.knn(q, xb, min(k, len(xb)), metric=faiss.METRIC_INNER_PRODUCT)
        heap.add_result(sc, np.where(pos >= 0, ib[np.maximum(pos, 0)], -1))
        codes.clear()
        ids.clear()
        if release is not None:
            release()

    for lst in range(ivf.nlist):
        m = invlists.list_size(lst)
        if m == 0:
            continue
        cptr, iptr = invlists.get_codes(lst), invlists.get_ids(lst)
        try:
            xs = faiss.rev_swig_ptr(cptr, m * ivf.code_size).view(np.float32).reshape(m, d)
            ix = faiss.rev_swig_ptr(iptr, m).view(np.int64)
            for a in range(0, m, limit):
                codes.append(xs[a : a + limit].copy())
                ids.append(ix[a : a + limit].copy())
                held += len(codes[-1])
                if held >= limit:
                    flush()
                    held = 0
        finally:
            invlists.release_codes(lst, cptr)
            invlists.release_ids(lst, iptr)
    if codes:
        flush()
    heap.finalize()
    return heap.D, heap.I


def exact_topk(rows: ChunkedRows, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product of q [B, D] over ``rows``, one chunk at a time."""
    heap = faiss.ResultHeap(len(q), k, keep_max=True)
    for start, block in rows.chunks():
        sc, rw = faiss.knn(q, block, min(k, len(block)), metric=faiss.METRIC_INNER_PRODUCT)
        heap.add_result(sc, rw + start)
    heap.finalize()
    return heap.D, heap.I
