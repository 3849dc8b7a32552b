"""Tests for gradindex.search.faiss_index: exact search against numpy brute force, recall of tuned
approximate indexes on held-out rows (heavy-tailed TracIn norms included), build-time
rejection of indexes that miss their target, save/load (plain FAISS and mmap), bad input."""

from __future__ import annotations

import json
import warnings

import faiss
import numpy as np
import pytest

from gradindex.errors import IndexStateError, SearchError
from gradindex.search import tuning as search_tuning
from gradindex.search.faiss_index import SearchResult, VectorIndex, set_num_threads


@pytest.fixture(autouse=True)
def one_thread():
    """Tests run on one FAISS thread: small problems, shared cores, deterministic HNSW builds."""
    set_num_threads(1)
    yield
    set_num_threads(None)


def clustered(n: int, d: int, method: str, seed: int = 0, clusters: int = 24) -> np.ndarray:
    """Rows on clustered directions with a decaying spectrum; TracIn norms lognormal(0, 1.5)."""
    rng = np.random.default_rng(seed)
    spectrum = np.arange(1, d + 1, dtype=np.float32) ** -0.5
    centers = rng.standard_normal((clusters, d), dtype=np.float32) * spectrum
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    x = centers[rng.integers(0, clusters, n)]
    x = x + rng.standard_normal((n, d), dtype=np.float32) * spectrum * 0.15
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    if method == "tracin":
        x *= rng.lognormal(0.0, 1.5, n).astype(np.float32)[:, None]
    return np.ascontiguousarray(x, dtype=np.float32)


def brute_force(q: np.ndarray, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """numpy top-k by inner product: argpartition, then sort by (-score, row)."""
    s = q.astype(np.float64) @ x.astype(np.float64).T  # [B, N]
    part = (
        np.argpartition(-s, k - 1, axis=1)[:, :k]
        if k < x.shape[0]
        else np.tile(np.arange(x.shape[0]), (len(q), 1))
    )
    ps = np.take_along_axis(s, part, axis=1)
    order = np.lexsort((part, -ps), axis=-1)
    return np.take_along_axis(ps, order, 1), np.take_along_axis(part, order, 1)


def recall(rows: np.ndarray, q: np.ndarray, x: np.ndarray, k: int = 10) -> float:
    exact, _ = brute_force(q, x, k)
    true = np.einsum("bd,bkd->bk", q.astype(np.float64), x[rows].astype(np.float64))
    return float((true >= exact[:, -1:] - 1e-6 * np.abs(exact[:, :1])).mean())


@pytest.mark.parametrize("method", ["tracin", "retrac"])
@pytest.mark.parametrize(("n", "d", "k"), [(997, 33, 7), (251, 5, 1), (13, 3, 13)])
def test_flat_equals_brute_force(method: str, n: int, d: int, k: int) -> None:
    x = clustered(n, d, method, seed=n)
    q = np.random.default_rng(1).standard_normal((9, d)).astype(np.float32)
    res = VectorIndex.build(x, method, kind="flat").search(q, k)
    scores, rows = brute_force(q, x, k)
    np.testing.assert_array_equal(res.rows, rows)
    np.testing.assert_array_equal(res.ids, rows)
    np.testing.assert_allclose(res.scores, scores, rtol=1e-5, atol=1e-5)
    assert res.scores.dtype == np.float32 and res.rows.dtype == np.int64


def test_ties_are_ordered_by_row() -> None:
    # small integers: every inner product is exact in float32, so duplicates tie exactly
    rng = np.random.default_rng(0)
    base = rng.integers(-3, 4, (40, 6)).astype(np.float32)
    x = np.concatenate([base, base[::-1], base[:7]])  # 87 rows, many exact duplicates
    q = rng.integers(-3, 4, (11, 6)).astype(np.float32)
    res = VectorIndex.build(x, "tracin", kind="flat").search(q, 9)
    scores, rows = brute_force(q, x, 9)
    np.testing.assert_array_equal(res.scores, scores.astype(np.float32))  # the same top-9 scores
    np.testing.assert_array_equal(np.einsum("bd,bkd->bk", q, x[res.rows]), res.scores)
    for r, s, bf_r in zip(res.rows, res.scores, rows, strict=True):
        assert len(set(r)) == 9
        for value in np.unique(s):  # equal scores come in row order
            assert list(r[s == value]) == sorted(r[s == value])
        above = s > s[-1]  # above the k-th score the set is forced; at it any tied row will do
        assert set(r[above]) == set(bf_r[above])


def test_result_unpacks_and_inputs_are_converted() -> None:
    x = clustered(300, 12, "retrac")
    vi = VectorIndex.build(np.asfortranarray(x.astype(np.float64)), "retrac", kind="flat")
    scores, ids = vi.search(x[::2][:5].astype(np.float64), 4)  # strided float64 queries
    assert isinstance(vi.search(x[:1], 1), SearchResult)
    np.testing.assert_array_equal(ids[:, 0], np.arange(0, 10, 2))
    assert scores.shape == (5, 4) and vi.ntotal == 300 and vi.dim == 12 and vi.method == "retrac"
    assert vi.search(np.zeros((0, 12)), 3).scores.shape == (0, 3)


def test_bulk_batches_match_one_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    x = clustered(500, 16, "tracin")
    q = clustered(23, 16, "retrac", seed=5)
    vi = VectorIndex.build(x, "tracin", kind="flat")
    whole = vi.search(q, 5)
    monkeypatch.setattr("gradindex.search.faiss_index.QUERY_BATCH", 4)
    parts = vi.search(q, 5)
    np.testing.assert_array_equal(whole.rows, parts.rows)
    np.testing.assert_allclose(whole.scores, parts.scores, rtol=1e-5)  # BLAS vs scan rounding
    assert faiss.cvar.distance_compute_blas_threshold == 4 * 16  # batches take the BLAS path


def split(n: int, m: int, d: int, method: str) -> tuple[np.ndarray, np.ndarray]:
    """Held-out split: m fresh rows of the same distribution as queries."""
    rows = clustered(n + m, d, method, seed=3)
    q = rows[n:] / np.linalg.norm(rows[n:], axis=1, keepdims=True)
    return rows[:n], q


@pytest.mark.parametrize(
    ("method", "kind"), [("tracin", "hnsw"), ("retrac", "hnsw"), ("retrac", "ivf")]
)
def test_approximate_meets_target_on_heldout_rows(method: str, kind: str) -> None:
    x, q = split(4000, 300, 24, method)
    vi = VectorIndex.build(x, method, kind=kind, target_recall=0.95)
    info = vi.info
    assert info["kind"] == kind and info["meets_target"] and info["fallback"] is None
    assert info["recall_at_10"] >= 0.95 and info["tune_recall_at_10"] >= 0.95
    assert set(info["knobs"]) == {"efSearch" if kind == "hnsw" else "nprobe"}
    assert recall(vi.search(q, 10).rows, q, x) >= 0.93  # fresh queries: same bar, small slack


@pytest.mark.parametrize("method", ["tracin", "retrac"])
def test_auto_tunes_approximate_kind(method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(search_tuning, "AUTO_FLAT_BELOW", 0)
    monkeypatch.setattr(search_tuning, "AUTO_FLAT_MAX_BYTES", 0)
    x, q = split(3000, 200, 20, method)
    vi = VectorIndex.build(x, method, kind="auto", target_recall=0.97)
    info = vi.info
    assert info["requested_kind"] == "auto" and info["kind"] in ("hnsw", "ivf")
    assert info["meets_target"] and info["recall_at_10"] >= 0.97
    assert recall(vi.search(q, 10).rows, q, x) >= 0.95


def test_auto_is_flat_for_small_n() -> None:
    info = VectorIndex.build(clustered(500, 8, "tracin"), "tracin").info
    assert info["kind"] == "flat" and info["recall_at_10"] == 1.0 and info["knobs"] == {}
    assert search_tuning.choose_kind(19_999, 4096) == "flat"
    assert search_tuning.choose_kind(100_000, 512) in ("hnsw", "ivf")


def hard_mips(n: int = 3000, d: int = 16) -> np.ndarray:
    """Unclustered directions, heavy-tailed norms: inner-product IVF cannot reach 0.999 cheaply."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x * rng.lognormal(0.0, 1.5, n).astype(np.float32)[:, None]


def test_missed_target_falls_back_to_flat() -> None:
    x = hard_mips()
    with pytest.warns(UserWarning, match="recall@10 .* < target 0.999"):
        vi = VectorIndex.build(x, "tracin", kind="ivf", target_recall=0.999)
    info = vi.info
    assert info["kind"] == "flat" and info["meets_target"] and info["recall_at_10"] == 1.0
    assert info["factory"] == "Flat" and info["knobs"] == {}  # the missed knobs: in fallback
    assert info["fallback"]["from"].startswith("IVF") and info["fallback"]["recall_at_10"] < 0.999
    assert info["ladder"][-1]["knobs"]["nprobe"] == info["fallback"]["knobs"]["nprobe"]
    q = np.random.default_rng(2).standard_normal((6, 16)).astype(np.float32)
    np.testing.assert_array_equal(vi.search(q, 10).rows, brute_force(q, x, 10)[1])


def test_missed_target_can_raise_or_be_kept() -> None:
    x = hard_mips(2000)
    with pytest.raises(SearchError, match="target 0.999"):
        VectorIndex.build(x, "tracin", kind="ivf", target_recall=0.999, on_miss="raise")
    with pytest.warns(UserWarning, match="kept it as asked"):
        vi = VectorIndex.build(x, "tracin", kind="ivf", target_recall=0.999, on_miss="warn")
    assert vi.info["kind"] == "ivf" and not vi.info["meets_target"]
    assert vi.info["recall_at_10"] < 0.999


@pytest.mark.parametrize("kind", ["hnsw", "ivf", "IVF16,SQ8"])
def test_exact_equals_brute_force_on_approximate_index(kind: str, monkeypatch) -> None:
    monkeypatch.setattr(
        "gradindex.search.faiss_index._CHUNK_BYTES", 4096
    )  # IVF rows in several chunks
    x = clustered(2500, 16, "tracin")
    q = np.random.default_rng(4).standard_normal((7, 16)).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a fallback would also be exact; we test kind below
        vi = VectorIndex.build(x, "tracin", kind=kind, on_miss="warn")
    assert vi.info["kind"] in ("hnsw", "ivf", "factory")
    res = vi.search(q, 12, exact=True)
    scores, rows = brute_force(q, x, 12)
    np.testing.assert_array_equal(res.rows, rows)
    np.testing.assert_allclose(res.scores, scores, rtol=1e-5)


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf", "IVF16,SQ8"])
def test_save_load_roundtrip(tmp_path, kind: str) -> None:
    x = clustered(2500, 16, "retrac")
    q = clustered(30, 16, "retrac", seed=9)
    vi = VectorIndex.build(x, "retrac", kind=kind)
    before = vi.search(q, 10)
    path = tmp_path / "retrac.faiss"
    vi.save(path)
    side = json.loads((tmp_path / "retrac.faiss.json").read_text())
    assert side["info"]["knobs"] == vi.info["knobs"] and side["class"] == "VectorIndex"
    for mmap in (False, True):
        back = VectorIndex.load(path, mmap=mmap)
        after = back.search(q, 10)
        np.testing.assert_array_equal(before.rows, after.rows)
        np.testing.assert_array_equal(before.scores, after.scores)
        assert back.info["mmap"] == mmap and back.info["recall_at_10"] == vi.info["recall_at_10"]
    plain = faiss.read_index(str(path))  # someone without gradindex: same rows at tuned knobs
    _, rows = plain.search(q, 10)
    np.testing.assert_array_equal(np.sort(rows, axis=1), np.sort(before.rows, axis=1))


def test_load_errors(tmp_path) -> None:
    with pytest.raises(IndexStateError, match="no index file"):
        VectorIndex.load(tmp_path / "missing.faiss")
    path = tmp_path / "a.faiss"
    VectorIndex.build(clustered(50, 4, "tracin"), "tracin", kind="flat").save(path)
    (tmp_path / "a.faiss.json").write_text("{not json")
    with pytest.raises(IndexStateError, match="corrupt sidecar"):
        VectorIndex.load(path)
    VectorIndex.build(clustered(60, 4, "tracin"), "tracin", kind="flat").save(tmp_path / "b")
    (tmp_path / "a.faiss.json").write_text((tmp_path / "b.json").read_text())
    with pytest.raises(IndexStateError, match="do not belong together"):
        VectorIndex.load(path)
    path.write_bytes(b"garbage")
    with pytest.raises(IndexStateError, match="cannot read FAISS index"):
        VectorIndex.load(path)


def test_bad_inputs_raise_search_error() -> None:
    x = clustered(40, 6, "tracin")
    vi = VectorIndex.build(x, "tracin", kind="flat")
    bad_calls = [
        lambda: vi.search(x[:2], 0),
        lambda: vi.search(x[:2], -3),
        lambda: vi.search(x[:2], 2.5),
        lambda: vi.search(x[:2], True),
        lambda: vi.search(x[0], 3),  # 1-D
        lambda: vi.search(x[:2, :5], 3),  # wrong dimension
        lambda: vi.search(np.full((2, 6), np.nan), 3),
        lambda: vi.search(np.array([[1e39] * 6]), 3),  # inf once cast to float32
        lambda: vi.search(np.array([["a"] * 6]), 3),
        lambda: VectorIndex.build(x, "cosine"),
        lambda: VectorIndex.build(x, "tracin", kind="no-such-index"),
        lambda: VectorIndex.build(np.zeros((0, 6)), "tracin"),
        lambda: VectorIndex.build(np.zeros((5, 0)), "tracin"),
        lambda: VectorIndex.build(x, "tracin", target_recall=1.5),
        lambda: VectorIndex.build(x, "tracin", on_miss="ignore"),
        lambda: set_num_threads(0),
    ]
    for call in bad_calls:
        with pytest.raises(SearchError) as err:
            call()
        assert "\n" not in str(err.value)


def test_k_larger_than_n_warns_and_clamps() -> None:
    x = clustered(8, 4, "retrac")
    vi = VectorIndex.build(x, "retrac", kind="flat")
    with pytest.warns(UserWarning, match="k=20 exceeds the 8 indexed rows"):
        res = vi.search(x[:3], 20)
    assert res.rows.shape == (3, 8)
    np.testing.assert_array_equal(np.sort(res.rows, axis=1), np.tile(np.arange(8), (3, 1)))


def _faiss_gpus() -> int:
    return faiss.get_num_gpus() if hasattr(faiss, "StandardGpuResources") else 0


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_to_gpu_searches_like_cpu_or_says_why_not(kind: str) -> None:
    """With faiss-gpu and a GPU, flat/IVF move there and answer as before; anywhere else (CPU
    faiss, HNSW) to_gpu warns with the reason and the CPU answers."""
    x = clustered(3000, 32, "tracin", seed=5)
    q = np.random.default_rng(2).standard_normal((40, 32)).astype(np.float32)
    index = VectorIndex.build(x, "tracin", kind=kind, target_recall=0.9)
    before = index.search(q, 10)
    expect_gpu = _faiss_gpus() > 0 and kind != "hnsw"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        moved = index.to_gpu()
    assert moved is expect_gpu
    assert index.info["search_device"] == ("gpu" if expect_gpu else "cpu")
    assert [("stays on the CPU" in str(w.message)) for w in caught] == [not expect_gpu]
    after = index.search(q, 10)
    if kind == "flat" or not expect_gpu:  # exact, or still the same CPU index
        np.testing.assert_array_equal(after.rows, before.rows)
    else:  # GPU IVF at the same nprobe: the same rows up to float ties
        assert (after.rows == before.rows).mean() > 0.95
    exact_scores, exact_rows = brute_force(q, x, 10)
    np.testing.assert_array_equal(index.search(q, 10, exact=True).rows, exact_rows)


def test_tuner_accepts_only_settings_whose_validation_half_meets_the_target() -> None:
    """Tuning half easy (the indexed rows themselves), validation half hard (random directions):
    low nprobe passes the tuning half long before the validation half, so a tuner that accepted
    a validation recall below target would stop early. Recall is recomputed here by brute force."""
    x = clustered(4000, 24, "retrac", seed=3)
    index, _ = search_tuning.make_index("IVF64,Flat", x, seed=0)
    rng = np.random.default_rng(1)
    easy = x[rng.choice(len(x), 200, replace=False)]
    hard = rng.standard_normal((200, 24)).astype(np.float32)
    target, margin = 0.95, search_tuning.TUNE_MARGIN

    def both_halves(nprobe: int) -> tuple[float, float]:
        index.nprobe = nprobe
        return recall(index.search(easy, 10)[1], easy, x), recall(
            index.search(hard, 10)[1], hard, x
        )

    report = search_tuning.tune(index, x, target, np.concatenate([easy, hard]))
    chosen = report.knobs["nprobe"]
    tune_r, valid_r = both_halves(chosen)
    assert report.met and valid_r >= target and tune_r >= target + margin
    assert report.recall == pytest.approx(valid_r) and report.tune_recall == pytest.approx(tune_r)
    lower = [v for v in search_tuning.NPROBE_GRID if v < chosen]
    early = [v for v in lower if both_halves(v)[0] >= target + margin]
    assert early, "the tuning half must pass below the chosen rung, or this test proves nothing"
    assert all(both_halves(v)[1] < target for v in early)  # each rejected for its validation half


def test_tune_queries_need_two_rows_to_split() -> None:
    x = np.random.default_rng(0).standard_normal((300, 8)).astype(np.float32)
    with pytest.raises(SearchError, match="tune_queries needs at least 2 rows"):
        VectorIndex.build(x, "tracin", kind="hnsw", tune_queries=x[:1])


def test_ivf_query_whose_probed_lists_hold_fewer_than_k_rows_is_answered_exactly(tmp_path):
    """FAISS pads such a result with row -1; every row returned is a real one, the exact top k."""
    x = clustered(2500, 16, "retrac")
    q = clustered(5, 16, "retrac", seed=9)
    vi = VectorIndex.build(x, "retrac", kind="ivf")
    assert vi.info["kind"] == "ivf"
    vi.save(tmp_path / "i.faiss")
    _, raw = faiss.read_index(str(tmp_path / "i.faiss")).search(q, 1000)  # the tuned knobs
    assert (raw < 0).any(axis=1).all()  # FAISS alone comes back short for every query
    res = vi.search(q, 1000)
    scores, rows = brute_force(q, x, 1000)
    np.testing.assert_array_equal(res.rows, rows)
    np.testing.assert_allclose(res.scores, scores, rtol=1e-5)


def test_recorded_recalls_are_brute_force_recalls_of_each_half_of_the_given_queries() -> None:
    """recall_at_10 is measured on the validation half (the second) of tune_queries, the knobs
    chosen on the first: each equals numpy's recall of the built index's answers there."""
    x = clustered(2500, 16, "retrac")
    q = clustered(200, 16, "retrac", seed=5)
    vi = VectorIndex.build(x, "retrac", kind="ivf", tune_queries=q)
    assert vi.info["kind"] == "ivf"
    tune, valid = (
        recall(vi.search(q[:100], 10).rows, q[:100], x),
        recall(vi.search(q[100:], 10).rows, q[100:], x),
    )
    assert abs(tune - valid) >= 0.002  # the halves can be told apart
    assert vi.info["recall_at_10"] == pytest.approx(valid, abs=1e-3)
    assert vi.info["tune_recall_at_10"] == pytest.approx(tune, abs=1e-3)
