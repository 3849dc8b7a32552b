"""search/exact.py and search/faiss_common.py: exact search over the rows an index keeps against
numpy brute force, and the shared checks / thread policy against hand-worked cases."""

from __future__ import annotations

import errno

import faiss
import numpy as np
import pytest

from gradindex.errors import SearchError, WriteError
from gradindex.search import faiss_common as fc
from gradindex.search.exact import exact_search_ivf, exact_topk, flat_storage, has_exact_rows
from gradindex.store.vectors import ChunkedRows


def _data(n=301, d=7, b=5, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32) * rng.gamma(1.0, 1.0, (n, 1)).astype(np.float32)
    return x, rng.normal(size=(b, d)).astype(np.float32)


def _brute(x, q, k, rows=None):
    s = q.astype(np.float64) @ x.astype(np.float64).T
    top = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, top, 1), top if rows is None else rows[top]


def test_exact_topk_over_chunks_and_a_row_subset_equals_brute_force():
    x, q = _data()
    for rows in (None, np.arange(0, 301, 3)):  # every row, or the unflagged ones
        chunked = ChunkedRows(x, rows, chunk_rows=17)  # many chunks, the last one short
        scores, ids = exact_topk(chunked, q, 6)
        sub = x if rows is None else x[rows]
        want_s, want_i = _brute(sub, q, 6)
        np.testing.assert_array_equal(ids, want_i)  # positions within the rows used
        np.testing.assert_allclose(scores, want_s, rtol=1e-5)


def test_exact_search_of_an_ivf_reads_every_list_in_bounded_pieces():
    x, q = _data(n=2000, d=8)
    quant = faiss.IndexFlatIP(8)
    ivf = faiss.IndexIVFFlat(quant, 8, 16, faiss.METRIC_INNER_PRODUCT)
    ivf.train(x)
    ivf.add(x)
    ivf.nprobe = 1  # the approximate search misses; the exact one must not
    released = []
    scores, ids = exact_search_ivf(ivf, q, 10, chunk_bytes=1, release=lambda: released.append(1))
    want_s, want_i = _brute(x, q, 10)
    np.testing.assert_array_equal(ids, want_i)
    np.testing.assert_allclose(scores, want_s, rtol=1e-5)
    assert len(released) >= 2000 // 1024  # pieces of at most 1024 rows, each released
    pq = faiss.IndexIVFPQ(faiss.IndexFlatIP(8), 8, 4, 2, 8, faiss.METRIC_INNER_PRODUCT)
    pq.train(x)
    with pytest.raises(SearchError, match="needs float32 rows"):
        exact_search_ivf(pq, q, 3, 1 << 20)


def test_which_indexes_keep_their_rows():
    x, _ = _data(n=300, d=8)
    flat = faiss.IndexFlatIP(8)
    hnsw = faiss.IndexHNSWFlat(8, 8, faiss.METRIC_INNER_PRODUCT)
    ivfpq = faiss.IndexIVFPQ(faiss.IndexFlatIP(8), 8, 4, 2, 8, faiss.METRIC_INNER_PRODUCT)
    for index in (flat, hnsw):
        index.add(x)
        storage = flat_storage(index)
        assert has_exact_rows(index) and storage.ntotal == 300
        np.testing.assert_array_equal(storage.reconstruct_n(0, 300), x)  # rows in row order
    assert not has_exact_rows(ivfpq) and flat_storage(ivfpq) is None
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(8), 8, 4, faiss.METRIC_INNER_PRODUCT)
    assert has_exact_rows(ivf) and flat_storage(ivf) is None  # rows in lists, not in order


def test_build_arguments_and_retrac_norms_are_checked_by_reason():
    fc.check_build_args("tracin", "fallback", 0.95, 0)
    for args, message in [
        (("trak", "fallback", 0.9, 0), "unknown method 'trak'"),
        (("tracin", "ignore", 0.9, 0), "unknown on_miss 'ignore'"),
        (("tracin", "warn", 1.5, 0), r"target_recall must be in \(0, 1\]"),
        (("tracin", "warn", 0.9, True), "seed must be an integer"),
    ]:
        with pytest.raises(SearchError, match=message):
            fc.check_build_args(*args)
    fc.check_common_norm(np.array([1.0, 1.005, 0.999]))  # float16 rounding passes
    for norms in ([1.0, 1.2], [0.0, 0.0]):
        with pytest.raises(SearchError, match="ranks by cosine"):
            fc.check_common_norm(np.array(norms))


def test_thread_policy_and_restore():
    before = faiss.omp_get_max_threads()
    try:
        assert fc.set_num_threads(3) == 3 == fc.batch_threads()

        @fc.restores_threads
        def search(single):
            return fc.configure(16, single_query=single), faiss.omp_get_max_threads()

        assert search(True) == (3, 1)  # one query: one thread
        assert search(False) == (3, 3)
        assert faiss.cvar.distance_compute_blas_threshold == fc.BLAS_MIN_QUERIES * 16
        assert faiss.omp_get_max_threads() == before  # the caller's count is back
        with pytest.raises(SearchError, match="positive integer"):
            fc.set_num_threads(0)
    finally:
        fc.set_num_threads(None)


def test_faiss_errors_become_one_line_reasons():
    e = RuntimeError(
        "Error in faiss::Index* faiss::index_factory(int, const char*) at /x/index_factory.cpp:"
        "1234: could not parse index string bogus"
    )
    assert fc.faiss_reason(e) == "could not parse index string bogus"
    assert fc.first_line(RuntimeError("a\n\n  b  \n")) == "b"
    full = RuntimeError(
        "Error in void faiss::write(...) at a.cpp:9: write error in x: 10 != 20 "
        "(No space left on device)"
    )
    err = fc.write_failure("idx/tracin.faiss", full)
    assert isinstance(err, WriteError) and err.errno == errno.ENOSPC
    assert str(err) == "cannot write idx/tracin.faiss: No space left on device"
    assert fc.write_failure("p", RuntimeError("bad index")) is None
    side = fc.sidecar_dict({"kind": "flat", "mmap": True})
    assert side["format"] == fc.FORMAT_VERSION and side["info"] == {"kind": "flat"}
