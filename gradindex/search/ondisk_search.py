"""Searching a memory-mapped on-disk IVF with the process's resident memory bounded.

FAISS scans the probed lists of a memory-mapped ``OnDiskInvertedLists`` in place: every page
it reads stays mapped into the process until unmapped, so one search of a 10^7-row index raised
peak RSS by the bytes of its probed lists (clustered rows make the probed lists the big ones). :func:`search_bounded` probes the same lists a few at
a time (``search_preassigned`` with the other probes masked out) and unmaps the pages after each
group (:func:`gradindex.search.ondisk_io.release_pages`; they stay in the page cache). The top-k
of the union of the groups' top-k is the top-k of all probed lists: the same answer as one
search, with only one group's pages resident at a time.
"""

from __future__ import annotations

import faiss
import numpy as np

from gradindex.search.ondisk_io import release_pages

RESIDENT_BYTES = 2 << 20
"""Bytes of inverted lists probed per group (a group is at least one list). The kernel maps
more than the bytes read (read-ahead fills the page cache in large folios, mapped whole), so
small groups keep resident memory near flat in N at some cost in query time; a larger value
trades memory for speed (figures: docs/search.md#why-the-search-code-is-shaped-this-way,
``benchmarks/bench_data.py --phases open``)."""


def search_bounded(
    index: faiss.Index, q: np.ndarray, k: int, budget: int = RESIDENT_BYTES
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (scores [B, k], ids [B, k]) of ``index`` at its nprobe, probing the lists in groups
    of at most ``budget`` bytes and unmapping their pages after each group. A group is a run of
    probe ranks over the whole batch, so a large batch's groups are single ranks touching up to
    B lists each: the bound is for one query or a few. An index that is not a bare IVF (a
    wrapper would transform the queries first) is searched whole, then released."""
    ivf = faiss.downcast_index(index)
    if not isinstance(ivf, faiss.IndexIVF):
        out = index.search(q, k)
        release_pages(index)
        return out
    q = np.ascontiguousarray(q, dtype=np.float32)
    nprobe = min(ivf.nprobe, ivf.nlist)  # FAISS clamps it so: its probe table is that wide
    coarse, probes = ivf.quantizer.search(q, nprobe)
    scores, ids = [], []
    for cols in _groups(ivf, probes, budget):
        masked = np.full_like(probes, -1)  # FAISS skips a probe of list -1
        masked[:, cols] = probes[:, cols]
        scores.append(np.empty((len(q), k), np.float32))
        ids.append(np.empty((len(q), k), np.int64))
        ptr = faiss.swig_ptr  # the C call: the Python one asserts a table nprobe wide
        ivf.search_preassigned_c(
            len(q), ptr(q), k, ptr(masked), ptr(coarse), ptr(scores[-1]), ptr(ids[-1]), False
        )
        release_pages(index)
    return _top_k(np.concatenate(scores, axis=1), np.concatenate(ids, axis=1), k)


def _groups(ivf: faiss.IndexIVF, probes: np.ndarray, budget: int) -> list[slice]:
    """Consecutive probe columns whose distinct lists hold at most ``budget`` bytes together
    (codes and ids), one column at least."""
    lists = ivf.invlists
    per_row = ivf.code_size + 8
    size = {int(j): lists.list_size(int(j)) * per_row for j in np.unique(probes) if j >= 0}
    groups, start, held = [], 0, 0
    for col in range(probes.shape[1]):
        cost = sum(size.get(int(j), 0) for j in np.unique(probes[:, col]))
        if col > start and held + cost > budget:
            groups.append(slice(start, col))
            start, held = col, 0
        held += cost
    groups.append(slice(start, probes.shape[1]))
    return groups


def _top_k(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best (largest score; missing results, id -1, last) of each row."""
    key = np.where(ids < 0, -np.inf, scores)
    order = np.argsort(-key, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)
