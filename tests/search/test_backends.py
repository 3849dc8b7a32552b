"""Search-backend conformance: every backend behind gradindex.search.backend.SearchBackend --
FAISS flat (the folder's own), FAISS HNSW and IVF, the on-disk IVF, Milvus Lite, and a numpy
brute-force test double written here against the interface -- answers the same way, alone and
through AttributionIndex(backends=...): top-k equal to numpy brute force over vectors.h5 (read
with h5py), rows that are store row numbers and never a flagged row, k > N, a 1-D query, a query
of the wrong dimension. The double needs no edit of query.py or cli.py to be searched."""

from __future__ import annotations

import warnings

import h5py
import numpy as np
import pytest

import gradindex as gi
from gradindex.search.backend import SearchBackend, SearchResult, StoreRows
from gradindex.search.faiss_index import VectorIndex
from gradindex.search.ondisk import build_ondisk
from tests.conftest import scheduler, tiny_unet

N = 48
FLAGGED = [3, 17, 30, 41]  # their gradients are poisoned with NaN, so the build flags them
K = 5
EXACT = ("faiss-folder", "faiss-flat", "milvus", "numpy")
APPROXIMATE = ("faiss-hnsw", "faiss-ivf", "ondisk")
METHODS = ("tracin", "retrac")


class NumpyBackend(SearchBackend):
    """Brute force over the store rows ``rows`` of ``x``: the interface's test double."""

    def __init__(self, x: np.ndarray, rows: np.ndarray) -> None:
        self.x, self.rows, self.dim = x, rows, x.shape[1]

    @property
    def num_rows(self) -> int:
        return len(self.rows)

    def search_rows(self, q: np.ndarray, k: int, exact: bool) -> SearchResult:
        s = q @ self.x[self.rows].T  # [B, num_rows]
        order = np.lexsort((np.broadcast_to(self.rows, s.shape), -s), axis=-1)[:, :k]
        rows = self.rows[order]
        return SearchResult(np.take_along_axis(s, order, 1).astype(np.float32), rows, rows)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A real index over N noise images, FLAGGED rows flagged at build time, and its rows read
    back with h5py: (path, {method: [N, D]}, flagged [N] bool, ids [N])."""
    from gradindex.featurize import gradients

    rng = np.random.default_rng(0)
    images = rng.random((N, 1, 8, 8), dtype=np.float32) * 0.8  # first pixel below 0.9 ...
    images[FLAGGED, 0, 0, 0] = 1.0  # ... except in the rows to poison
    original = gradients.GradientFeaturizer.featurize

    def poisoned(self, x0, draws, cond=None, **kw):
        f = original(self, x0, draws, cond, **kw)
        f.tracin[x0.flatten(1)[:, 0] > 0.9] = float("nan")
        return f

    root = tmp_path_factory.mktemp("backends")
    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mp.setattr(gradients.GradientFeaturizer, "featurize", poisoned)
        idx = gi.build_index(
            checkpoints=[(tiny_unet(1), scheduler()), (tiny_unet(2), scheduler())],
            data=images,
            out=root / "idx",
            spec=gi.BuildSpec(proj_dim=16, timesteps=2, checkpoint_weights=(1.0, 3.0)),
            ids=[f"s{i:02d}" for i in range(N)],
            progress=False,
        )
    with h5py.File(idx.path / "vectors.h5", "r") as f:
        x = {m: f[m][()].astype(np.float32) for m in METHODS}
        flagged = f["flagged"][()].astype(bool)
    assert np.flatnonzero(flagged).tolist() == FLAGGED
    return idx.path, x, flagged, idx.ids


def _milvus(path, store_rows, manifest) -> dict[str, SearchBackend]:
    pytest.importorskip("pymilvus", reason="pymilvus is not installed")
    pytest.importorskip("milvus_lite", reason="Milvus Lite is not installed")
    from gradindex.search.milvus import export_index, open_backends

    uri = str(path.parent / "lite.db")
    if not (path.parent / "lite.db").exists():
        export_index(path, uri, progress=False)
    return open_backends(uri, path, manifest, len(store_rows))


def _backends(name: str, folder, tmp_path) -> dict[str, SearchBackend]:
    """{method: the backend ``name`` over the folder's unflagged rows, in store rows}."""
    path, x, flagged, _ = folder
    rows = np.flatnonzero(~flagged)
    if name == "faiss-folder":  # what AttributionIndex.open(path) searches by default
        return gi.AttributionIndex.open(path).backends
    if name == "milvus":
        return _milvus(path, rows, gi.AttributionIndex.open(path).manifest)
    out: dict[str, SearchBackend] = {}
    for m in METHODS:
        sub = x[m][rows]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tiny data: ladders may miss the target
            if name == "numpy":
                out[m] = NumpyBackend(x[m], rows)
                continue
            if name == "ondisk":
                inner = build_ondisk(sub, tmp_path / f"{m}.faiss", m, on_miss="warn")
            else:
                kind = {"faiss-flat": "flat", "faiss-hnsw": "hnsw", "faiss-ivf": "ivf"}[name]
                inner = VectorIndex.build(sub, m, kind, on_miss="warn")
        out[m] = StoreRows(inner, rows)
    return out


def _brute_force(x, flagged, q, k):
    """Top-k store rows (never flagged) and scores of q over x, by numpy, best first."""
    s = (q.astype(np.float64) @ x.T.astype(np.float64))[:, ~flagged]
    usable = np.flatnonzero(~flagged)
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, order, 1), usable[order]


def _queries(x, seed=1):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((7, x.shape[1])).astype(np.float32) * np.nanmean(np.abs(x))


BACKENDS = EXACT + APPROXIMATE


@pytest.mark.parametrize("name", BACKENDS)
def test_top_k_equals_brute_force(name, folder, tmp_path):
    path, x, flagged, ids = folder
    backends = _backends(name, folder, tmp_path)
    idx = gi.AttributionIndex.open(path, backends=backends)
    for m in METHODS:
        q = _queries(x[m])
        ref_scores, ref_rows = _brute_force(x[m], flagged, q, K)
        for res in (backends[m].search(q, K), idx.search(q, K, m)):
            assert res.rows.shape == res.scores.shape == (len(q), K)
            assert res.scores.dtype == np.float32 and res.rows.dtype == np.int64
            assert (np.diff(res.scores, axis=1) <= 0).all()  # best first
            # every score is the row's own inner product with the query
            own = np.einsum("bd,bkd->bk", q, x[m][res.rows])
            np.testing.assert_allclose(res.scores, own, rtol=1e-4, atol=1e-5)
            if name in EXACT:
                np.testing.assert_array_equal(res.rows, ref_rows)
                np.testing.assert_allclose(res.scores, ref_scores, rtol=1e-4, atol=1e-5)
            else:  # approximate: recall@K against brute force
                hit = [len(set(a) & set(b)) for a, b in zip(res.rows, ref_rows, strict=True)]
                assert np.mean(hit) / K >= 0.8, (name, m, hit)
        np.testing.assert_array_equal(idx.search(q, K, m).ids, ids[idx.search(q, K, m).rows])
        exact = idx.search(q, K, m, exact=True)  # exact on request, whatever the backend
        np.testing.assert_array_equal(exact.rows, ref_rows)


@pytest.mark.parametrize("name", BACKENDS)
def test_rows_are_store_rows_and_flagged_rows_never_come_back(name, folder, tmp_path):
    path, x, flagged, ids = folder
    idx = gi.AttributionIndex.open(path, backends=_backends(name, folder, tmp_path))
    usable = np.flatnonzero(~flagged)
    # ReTrac rows share one norm: each unflagged row finds itself first, by its store row number
    own = idx.search(x["retrac"][usable], 1, "retrac", exact=True)
    np.testing.assert_array_equal(own.rows[:, 0], usable)
    np.testing.assert_array_equal(own.ids[:, 0], ids[usable])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        every = idx.search(_queries(x["tracin"], 2), len(usable), "tracin")
    for row in every.rows:  # all of them, each once, none flagged
        assert sorted(row.tolist()) == usable.tolist()


@pytest.mark.parametrize("name", BACKENDS)
def test_k_above_the_rows_warns_and_returns_them_all(name, folder, tmp_path):
    path, x, flagged, _ = folder
    backends = _backends(name, folder, tmp_path)
    idx = gi.AttributionIndex.open(path, backends=backends)
    n = int((~flagged).sum())
    q = _queries(x["retrac"], 3)
    ref_scores, ref_rows = _brute_force(x["retrac"], flagged, q, n)
    with pytest.warns(UserWarning, match=f"k={N + 5} exceeds the {n} indexed samples"):
        res = idx.search(q, N + 5, "retrac", exact=True)
    np.testing.assert_array_equal(res.rows, ref_rows)
    with pytest.warns(UserWarning, match=f"k={N + 5} exceeds the {n} indexed rows"):
        alone = backends["retrac"].search(q, N + 5, exact=True)
    np.testing.assert_array_equal(alone.rows, ref_rows)
    np.testing.assert_allclose(alone.scores, ref_scores, rtol=1e-4, atol=1e-5)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(gi.SearchError, match="must be a positive integer"):
            backends["retrac"].search(q, bad)
        with pytest.raises(gi.SearchError, match="must be a positive integer"):
            idx.search(q, bad, "retrac")


@pytest.mark.parametrize("name", BACKENDS)
def test_one_query_vector_and_bad_queries(name, folder, tmp_path):
    path, x, flagged, _ = folder
    backends = _backends(name, folder, tmp_path)
    idx = gi.AttributionIndex.open(path, backends=backends)
    v = x["retrac"][np.flatnonzero(~flagged)[5]]  # [D]
    one = idx.search(v, K, "retrac")  # a [D] vector is one query
    np.testing.assert_array_equal(one.rows, idx.search(v[None], K, "retrac").rows)
    np.testing.assert_array_equal(one.rows, _brute_force(x["retrac"], flagged, v[None], K)[1])
    with pytest.raises(gi.SearchError, match=r"2-D array \[N, D\]"):
        backends["retrac"].search(v, K)  # the interface itself takes [B, D] only
    d = x["retrac"].shape[1]
    for searcher in (
        lambda q: backends["tracin"].search(q, K),
        lambda q: idx.search(q, K, "tracin"),
    ):
        with pytest.raises(gi.SearchError, match=f"dimension {d + 1} but the index holds {d}"):
            searcher(np.ones((2, d + 1), np.float32))
        with pytest.raises(gi.SearchError, match="NaN or inf"):
            searcher(np.full((2, d), np.nan, np.float32))


def test_backends_that_do_not_fit_the_folder_are_refused(folder):
    path, x, flagged, _ = folder
    rows = np.flatnonzero(~flagged)
    good = {m: NumpyBackend(x[m], rows) for m in METHODS}
    with pytest.raises(gi.IndexStateError, match="no search backend for method 'retrac'"):
        gi.AttributionIndex.open(path, backends={"tracin": good["tracin"]})
    wrong = dict(good, retrac=NumpyBackend(x["retrac"], rows[:-1]))
    with pytest.raises(gi.IndexStateError, match=f"holds {len(rows) - 1} rows"):
        gi.AttributionIndex.open(path, backends=wrong)
    with pytest.raises(gi.SearchError, match="milvus= or backends=, not both"):
        gi.AttributionIndex.open(path, backends=good, milvus="unused.db")
    with pytest.raises(gi.IndexStateError, match="cannot stand for"):
        StoreRows(VectorIndex.build(x["tracin"][rows], "tracin", "flat"), rows[:-1])
