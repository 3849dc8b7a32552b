"""Limits the search code keeps that its results alone do not show: how exact search over IVF
lists groups rows into pieces, what ``auto`` / ``ivf`` choose for a size, the training sample,
and the held-out queries' shape. Each expected value is worked out by hand here."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from gradindex.search import tuning as st
from gradindex.search.exact import exact_search_ivf


def _ivf(n: int = 2000, d: int = 8, nlist: int = 16) -> tuple[faiss.Index, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, d)).astype(np.float32)
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
    ivf.train(x)
    ivf.add(x)
    return ivf, x


def test_exact_ivf_search_gathers_lists_into_pieces_of_at_least_1024_rows():
    # chunk_bytes=1 asks for the smallest pieces: the floor of 1024 rows still holds, so 2000
    # rows in 16 lists of ~125 give one full piece (>= 1024 rows) and the rest: 2 releases
    ivf, x = _ivf()
    q = x[:3] + 0.1
    released: list[int] = []
    _, ids = exact_search_ivf(ivf, q, 5, chunk_bytes=1, release=lambda: released.append(1))
    assert 1 <= len(released) <= 2000 // 1024 + 1
    want = np.argsort(-(q.astype(np.float64) @ x.T.astype(np.float64)), axis=1)[:, :5]
    np.testing.assert_array_equal(ids, want)


def test_ivf_factory_keeps_39_training_rows_per_list():
    # 4 sqrt(N) lists rounded to a power of two, at most N // 39 of them
    assert st.factory_for("ivf", 1000) == "IVF25,Flat"  # 4 sqrt(1000) = 126 -> 128 > 1000 // 39
    assert st.factory_for("ivf", 100_000) == "IVF1024,Flat"  # 1265 -> 2**10; 2564 allowed
    assert st.factory_for("ivf", 10) == "IVF1,Flat"


def test_auto_takes_ivf_when_hnsw_would_fill_over_half_the_memory(monkeypatch):
    n, d = 100_000, 128
    hnsw_bytes = n * (4 * d + 32 * 2 * 4 * 1.1)  # rows plus 32 links each way
    monkeypatch.setattr(st, "available_memory", lambda: int(hnsw_bytes / 0.5) + 1000)
    assert st.choose_kind(n, d) == "hnsw"
    monkeypatch.setattr(st, "available_memory", lambda: int(hnsw_bytes / 0.5) - 1000)
    assert st.choose_kind(n, d) == "ivf"
    monkeypatch.setattr(st, "available_memory", lambda: None)  # unknown: HNSW
    assert st.choose_kind(n, d) == "hnsw"


def test_training_sample_is_40_rows_per_list_sorted_and_distinct():
    rows = st.training_rows(100_000, 1000, seed=3)
    assert len(rows) == 40_000
    assert np.all(np.diff(rows) > 0) and rows[0] >= 0 and rows[-1] < 100_000
    assert len(st.training_rows(100_000, 10, seed=3)) == 10_000  # the floor
    assert st.training_rows(5000, 10, seed=3) is None  # every row


def test_heldout_queries_start_from_unit_rows(monkeypatch):
    monkeypatch.setattr(st, "QUERY_NOISE", 0.0)  # the unit rows alone
    rng = np.random.default_rng(1)
    x = (rng.normal(size=(50, 6)) * rng.uniform(1, 1000, (50, 1))).astype(np.float32)
    x[7] = 0
    q = st.heldout_queries(x, 200, seed=2)
    norms = np.linalg.norm(q, axis=1)
    unit = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-30)
    for row, nq in zip(q, norms, strict=True):
        if nq == 0:  # the zero row stays zero
            continue
        assert nq == pytest.approx(1.0, rel=1e-5)
        assert np.max(unit @ row) == pytest.approx(1.0, rel=1e-5)  # one row's direction


def test_heldout_query_noise_has_the_norm_of_a_unit_row():
    # zero rows leave the noise alone: N(0, I / D) * QUERY_NOISE, so E|noise|^2 = 1 at any D
    for d in (4, 256):
        q = st.heldout_queries(np.zeros((10, d), np.float32), 2000, seed=0)
        assert np.mean(np.sum(q.astype(np.float64) ** 2, axis=1)) == pytest.approx(1.0, rel=0.1)


def test_recall_counts_a_missing_result_as_a_miss():
    # rows' scores for q = [1]: 10, 1, 0; exact top-2 scores [10, 1]
    x = np.array([[10.0], [1.0], [0.0]], np.float32)
    q = np.ones((1, 1), np.float32)
    exact = np.array([[10.0, 1.0]], np.float32)
    assert st.recall_at_k(np.array([[0, 1]]), q, x, exact) == 1.0
    assert st.recall_at_k(np.array([[0, -1]]), q, x, exact) == 0.5  # -1: no row found
    assert st.recall_at_k(np.array([[2, 1]]), q, x, exact) == 0.5


def test_tuning_half_must_clear_the_target_by_the_margin():
    """Tuning half hard (random directions), validation half easy (indexed rows): the target is
    put just under one rung's tuning recall, so that rung passes the target but not the margin;
    recall is recomputed by brute force."""
    rng = np.random.default_rng(3)
    centers = rng.standard_normal((24, 24))
    x = (centers[rng.integers(0, 24, 4000)] + 0.3 * rng.standard_normal((4000, 24))).astype(
        np.float32
    )
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    index, _ = st.make_index("IVF64,Flat", x, seed=0)
    hard = rng.standard_normal((200, 24)).astype(np.float32)
    easy = x[rng.choice(len(x), 200, replace=False)]

    def brute_recall(q: np.ndarray, nprobe: int) -> float:
        index.nprobe = nprobe
        found = index.search(q, 10)[1]
        s = q.astype(np.float64) @ x.T.astype(np.float64)
        kth = -np.sort(-s, axis=1)[:, 9:10]
        return float((np.take_along_axis(s, found, 1) >= kth - 1e-6).mean())

    grid = [1, 2, 3, 4, 6, 8, 12, 16]  # nprobe rungs below 64 lists / 4
    hard_r = {p: brute_recall(hard, p) for p in grid}
    rung = next(p for p in grid if 0.8 <= hard_r[p] < 0.985)
    target = hard_r[rung] - st.TUNE_MARGIN / 2
    assert brute_recall(easy, rung) >= target and hard_r[16] >= target + st.TUNE_MARGIN
    report = st.tune(index, x, target, np.concatenate([hard, easy]))
    chosen = report.knobs["nprobe"]
    assert report.met and hard_r[chosen] >= target + st.TUNE_MARGIN
    assert chosen == next(p for p in grid if hard_r[p] >= target + st.TUNE_MARGIN)


def test_re_ranking_factor_shrinks_to_the_smallest_that_holds():
    # SQ8 codes rank nearly as exact search does: at a low target every k_factor passes, so
    # the smallest one, 1, is kept
    from gradindex.search.faiss_index import VectorIndex

    x = np.random.default_rng(0).standard_normal((3000, 16)).astype(np.float32)
    index = VectorIndex.build(x, "tracin", kind="SQ8", target_recall=0.5)
    assert index.info["factory"] == "SQ8,RFlat"
    assert index.info["knobs"] == {"k_factor": 1}


@pytest.mark.parametrize("recall", [0, 0.0, -0.1, 1.01])
def test_check_kind_refuses_a_target_recall_outside_0_1(recall):
    from gradindex.errors import SearchError

    with pytest.raises(SearchError, match=r"in \(0, 1\]"):
        st.check_kind("flat", 8, recall)
    st.check_kind("flat", 8, 1)  # 1 itself is allowed


def test_pq_codes_skip_polysemous_training():
    from gradindex.search.tuning import make_index

    x = np.random.default_rng(0).standard_normal((2000, 8)).astype(np.float32)
    index, factory = make_index("PQ4", x, seed=0)
    assert factory == "PQ4,RFlat"
    pq = faiss.downcast_index(faiss.downcast_index(index).base_index)
    assert isinstance(pq, faiss.IndexPQ) and not pq.do_polysemous_training


def test_bounded_search_groups_count_codes_and_ids_bytes():
    from gradindex.search.ondisk_search import _groups

    ivf, _ = _ivf(n=2000, d=8, nlist=16)
    sizes = [ivf.invlists.list_size(j) for j in range(16)]
    per_row = 4 * 8 + 8  # float32 codes of d = 8, one int64 id
    probes = np.array([[0, 1, 2]])
    both = per_row * (sizes[0] + sizes[1])
    assert _groups(ivf, probes, both)[0] == slice(0, 2)  # lists 0 and 1 fit exactly
    assert _groups(ivf, probes, both - 1)[0] == slice(0, 1)  # a byte short: list 0 alone
    assert _groups(ivf, probes, 1) == [slice(0, 1), slice(1, 2), slice(2, 3)]  # one list at least


@pytest.mark.parametrize("recall", [0, 0.0, 1.5])
def test_build_refuses_a_target_recall_outside_0_1(recall):
    from gradindex.errors import SearchError
    from gradindex.search.faiss_index import VectorIndex

    with pytest.raises(SearchError, match=r"target_recall must be in \(0, 1\]"):
        VectorIndex.build(np.ones((4, 2), np.float32), "tracin", "flat", target_recall=recall)


def test_a_zero_thread_setting_in_the_environment_is_ignored(monkeypatch):
    from gradindex.search import faiss_common as fc

    monkeypatch.setattr(fc, "_num_threads", None)
    monkeypatch.setenv("GRADINDEX_NUM_THREADS", "3")
    assert fc.batch_threads() == 3
    monkeypatch.setenv("GRADINDEX_NUM_THREADS", "0")
    assert fc.batch_threads() >= 1


@pytest.mark.parametrize("key, value", [("dim", 5), ("n", 4)])
def test_load_refuses_a_sidecar_of_another_shape(tmp_path, key, value):
    import json

    from gradindex.errors import IndexStateError
    from gradindex.search.faiss_index import VectorIndex

    path = tmp_path / "tracin.faiss"
    VectorIndex.build(np.eye(3, 4, dtype=np.float32), "tracin", "flat").save(path)
    side = json.loads((tmp_path / "tracin.faiss.json").read_text())
    side["info"][key] = value
    (tmp_path / "tracin.faiss.json").write_text(json.dumps(side))
    with pytest.raises(IndexStateError, match="holds 3x4 vectors but its sidecar says"):
        VectorIndex.load(path)


@pytest.mark.parametrize("key", ["method", "n", "dim"])
def test_load_refuses_a_sidecar_missing_a_required_key(tmp_path, key):
    import json

    from gradindex.errors import IndexStateError
    from gradindex.search.faiss_index import VectorIndex

    path = tmp_path / "tracin.faiss"
    VectorIndex.build(np.eye(3, 4, dtype=np.float32), "tracin", "flat").save(path)
    side = json.loads((tmp_path / "tracin.faiss.json").read_text())
    del side["info"][key]
    (tmp_path / "tracin.faiss.json").write_text(json.dumps(side))
    with pytest.raises(IndexStateError, match=f"corrupt sidecar .*KeyError: '{key}'"):
        VectorIndex.load(path)


@pytest.mark.parametrize("fmt", [None, 0, 999])
def test_load_refuses_a_sidecar_of_another_format(tmp_path, fmt):
    import json

    from gradindex.errors import IndexStateError
    from gradindex.search.faiss_index import VectorIndex

    path = tmp_path / "tracin.faiss"
    VectorIndex.build(np.eye(3, 4, dtype=np.float32), "tracin", "flat").save(path)
    side = json.loads((tmp_path / "tracin.faiss.json").read_text())
    side["format"] = fmt
    (tmp_path / "tracin.faiss.json").write_text(json.dumps(side))
    with pytest.raises(IndexStateError, match=f"has format {fmt!r}, this gradindex reads"):
        VectorIndex.load(path)


def test_a_failed_save_leaves_no_temporary_file(tmp_path):
    """The target is a folder: the FAISS file is written beside it, then cannot replace it."""
    from gradindex.errors import IndexStateError
    from gradindex.search.faiss_index import VectorIndex

    path = tmp_path / "tracin.faiss"
    (path / "inside").mkdir(parents=True)
    vi = VectorIndex.build(np.eye(3, 4, dtype=np.float32), "tracin", "flat")
    with pytest.raises(IndexStateError, match="tracin.faiss: Is a directory"):
        vi.save(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tracin.faiss"]


@pytest.mark.parametrize("kind", ["", "   ", None, 3])
def test_a_blank_or_non_string_kind_is_refused_naming_the_kinds(kind):
    from gradindex.errors import SearchError
    from gradindex.search.faiss_index import VectorIndex

    with pytest.raises(SearchError, match=r"kind must be one of \('flat', 'ivf', 'hnsw', 'auto'\)"):
        VectorIndex.build(np.eye(3, 4, dtype=np.float32), "tracin", kind=kind)
