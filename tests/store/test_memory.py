"""Opening an index and answering a query allocate memory independent of N: the ids, flagged
mask and search-row map are read on demand (a search reads its k ids), never whole."""

from __future__ import annotations

import json
import shutil
import tracemalloc

import h5py
import numpy as np
import pytest

import gradindex as gi
from gradindex.query import AttributionIndex
from gradindex.search.ondisk import build_from_store
from gradindex.store import columns
from gradindex.store.columns import IdentityRows, LazyColumn, search_rows
from gradindex.store.kernel import write_kernel
from gradindex.store.layout import MANIFEST, VECTORS, faiss_file, file_records, write_json_atomic
from gradindex.store.vectors import VectorStore
from tests.conftest import scheduler, tiny_unet


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    rng = np.random.default_rng(0)
    out = tmp_path_factory.mktemp("tmpl") / "idx"
    gi.build_index(
        checkpoints=[(tiny_unet(1), scheduler())], data=rng.random((40, 1, 8, 8), np.float32),
        out=out, spec=gi.BuildSpec(proj_dim=16, timesteps=1), progress=False, fidelity_sample=0,
    )  # fmt: skip
    return out


def grow(tmpl, out, n: int, flag_every: int = 0):
    """An index folder of n random rows with string ids, written through ``VectorStore``'s
    writer and the build's own index / kernel / manifest writers."""
    shutil.copytree(tmpl, out, ignore=shutil.ignore_patterns("*.faiss*", VECTORS))
    man = json.loads((out / MANIFEST).read_text())
    with VectorStore.open(tmpl / VECTORS) as t:
        dim, attrs = t.dim, {"spec": str(t.attr("spec"))}
    ids = np.array([f"sample-{i:09d}.png" for i in range(n)])
    store = VectorStore.create(out / VECTORS, ids, dim, 1, 1, "float32", attrs)
    store.file.attrs["build_id"] = man["build_id"]
    x = np.random.default_rng(n).standard_normal((n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)  # ReTrac rows: unit norm
    flagged = np.zeros(n, bool)
    if flag_every:
        flagged[::flag_every] = True
    store.write_rows(0, x, x, np.ones((n, 1, 1), np.float32), flagged)
    store.close()
    keep = np.flatnonzero(~flagged)
    with VectorStore.open(out / VECTORS) as reader:
        man["indexes"] = {
            m: build_from_store(reader, m, keep if flag_every else None, "flat", 0.95,
                                out / faiss_file(m))
            for m in ("tracin", "retrac")
        }  # fmt: skip
    man.update(num_rows=n, num_flagged=int(flagged.sum()))
    man["kernel"] = write_kernel(out, [1.0], man["build_id"])
    man["files"] = file_records(out)
    write_json_atomic(out / MANIFEST, man)
    return x, ids, flagged


def _open_and_search(folder, q) -> tuple[int, object]:
    """Peak bytes Python / numpy allocated while opening ``folder`` and searching ``q``."""
    tracemalloc.start()
    try:
        idx = AttributionIndex.open(folder)
        res = idx.search(q, k=10, method="retrac")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return peak, res


def test_open_and_search_allocate_the_same_for_10x_the_rows(template, tmp_path, monkeypatch):
    monkeypatch.setattr(columns, "CHUNK", 8192)  # masks are scanned in chunks of this many rows
    peaks = {}
    for n in (20_000, 200_000):
        x, ids, _ = grow(template, tmp_path / f"i{n}", n)
        q = x[[3, 7]]
        peaks[n], res = _open_and_search(tmp_path / f"i{n}", q)
        assert res.ids[:, 0].tolist() == [ids[3], ids[7]]  # exact search finds each row itself
        order = np.argsort(-(q @ x.T), axis=1)[:, :10]
        np.testing.assert_array_equal(res.ids, ids[order])
    # whole string ids alone would be > 10 MB at 200 000 rows
    assert peaks[200_000] < 1.2 * peaks[20_000] + (256 << 10), peaks


def test_flagged_rows_map_search_rows_to_the_right_ids(template, tmp_path):
    x, ids, flagged = grow(template, tmp_path / "f", 5000, flag_every=7)
    idx = AttributionIndex.open(tmp_path / "f")
    assert int(idx.flagged.sum()) == flagged.sum() and len(idx) == 5000
    res = idx.search(x[[8, 15]], k=5, method="retrac")
    keep = np.flatnonzero(~flagged)
    order = keep[np.argsort(-(x[[8, 15]] @ x[keep].T), axis=1)[:, :5]]
    np.testing.assert_array_equal(res.rows, order)
    np.testing.assert_array_equal(res.ids, ids[order])


def test_lazy_column_indexes_like_the_array(tmp_path):
    ids = np.array([f"s{i}" for i in range(50)], dtype=object)
    with h5py.File(tmp_path / "c.h5", "w") as f:
        f.create_dataset("ids", data=ids, dtype=h5py.string_dtype("utf-8"))
        f["flagged"] = (np.arange(50) % 3 == 0).astype(np.uint8)
    col = LazyColumn(tmp_path / "c.h5", "ids")
    for index in (slice(3, 9), 4, -1, np.array([[5, 1], [5, 49]]), np.array([-2, 0])):
        np.testing.assert_array_equal(col[index], ids[index])
    assert len(col) == 50 and list(col) == ids.tolist() and col.tolist() == ids.tolist()
    flags = LazyColumn(tmp_path / "c.h5", "flagged", as_bool=True)
    assert flags.sum() == 17 and flags.any() and np.asarray(flags).dtype == bool
    np.testing.assert_array_equal(search_rows(flags), np.flatnonzero(np.arange(50) % 3))
    with pytest.raises(IndexError):
        col[np.array([50])]


def test_identity_rows_are_the_row_numbers():
    rows = IdentityRows(10)
    np.testing.assert_array_equal(rows[np.array([[3, -1]])], [[3, 9]])
    np.testing.assert_array_equal(np.asarray(rows), np.arange(10))
    assert len(rows) == 10 and rows[2] == 2 and list(rows[7:]) == [7, 8, 9]
