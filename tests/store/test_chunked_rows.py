"""store/vectors.py: ChunkedRows over a row subset, against numpy fancy indexing of the array
(one row missing from a chunk, a chunk with none), and a store of another shape refused."""

from __future__ import annotations

import numpy as np
import pytest

from gradindex.errors import SearchError
from gradindex.store.vectors import ChunkedRows


def _x(n: int = 10, d: int = 3) -> np.ndarray:
    return np.arange(n * d, dtype=np.float32).reshape(n, d)


@pytest.mark.parametrize(
    "rows",
    [np.delete(np.arange(10), 4), np.array([0, 9]), np.array([1, 2, 3, 7]), np.arange(10)],
)
def test_chunks_of_a_subset_are_those_rows_in_order_and_never_empty(rows):
    x = _x()
    got = list(ChunkedRows(x, rows, chunk_rows=3).chunks())
    assert all(len(block) > 0 for _, block in got)
    starts = [start for start, _ in got]
    assert starts == list(np.cumsum([0] + [len(b) for _, b in got])[:-1])
    np.testing.assert_array_equal(np.concatenate([b for _, b in got]), x[rows])


def test_rows_by_number_go_through_the_subset():
    x, rows = _x(), np.array([1, 4, 5, 8])
    chunked = ChunkedRows(x, rows, chunk_rows=2)
    np.testing.assert_array_equal(chunked[[0, 3, 3, 2]], x[[1, 8, 8, 5]])
    np.testing.assert_array_equal(chunked[np.array([[1], [0]])], x[[[4], [1]]])


@pytest.mark.parametrize("rows", [[1, 1, 2], [2, 1], [-1, 3], [3, 10]])
def test_repeated_unordered_or_out_of_range_rows_are_refused(rows):
    with pytest.raises(SearchError, match="increasing row numbers below 10"):
        ChunkedRows(_x(), np.array(rows))


def test_a_store_of_another_width_than_the_manifest_is_refused(tmp_path):
    from gradindex.errors import IndexStateError
    from gradindex.store.vectors import VectorStore

    ids = np.arange(3)
    with VectorStore.create(tmp_path / "v.h5", ids, 4, 1, 1, "float32", {}) as store:
        store.check_manifest({"num_rows": 3, "dim": 4})
        with pytest.raises(IndexStateError, match="holds 3x4 rows but the manifest says 3x5"):
            store.check_manifest({"num_rows": 3, "dim": 5})
        with pytest.raises(IndexStateError, match="holds 3x4 rows but the manifest says 2x4"):
            store.check_manifest({"num_rows": 2, "dim": 4})
