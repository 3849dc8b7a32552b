"""On-disk IVF (gradindex.search.ondisk): built from an HDF5 store in chunks, it answers like the in-RAM
IVF with the same quantizer and nprobe, its exact search equals numpy brute force, its folder can
be moved, an interrupted build leaves nothing that opens, and no read takes more than a chunk."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import faiss
import h5py
import numpy as np
import pytest

import gradindex as gi
from gradindex.errors import IndexStateError, SearchError
from gradindex.search import faiss_index, ondisk
from gradindex.search.faiss_index import VectorIndex, set_num_threads
from gradindex.search.ondisk import build_ondisk
from gradindex.search.ondisk_search import _groups, search_bounded
from gradindex.store.vectors import ChunkedRows
from tests.conftest import run
from tests.search.test_search import brute_force, clustered

N, D = 2999, 40


@pytest.fixture(autouse=True)
def one_thread():
    set_num_threads(1)
    yield
    set_num_threads(None)


class Recorder:
    """An array that records how many rows each read returns (and can fail on the n-th read)."""

    def __init__(self, x: np.ndarray, fail_at: int | None = None):
        self.x, self.shape, self.sizes, self.fail_at = x, x.shape, [], fail_at

    def __getitem__(self, key):
        if self.fail_at is not None and len(self.sizes) == self.fail_at:
            raise KeyboardInterrupt("simulated interruption")
        out = self.x[key]
        self.sizes.append(len(out))
        return out


def h5_rows(tmp_path, x: np.ndarray, dtype="float32") -> h5py.Dataset:
    f = h5py.File(tmp_path / "store.h5", "w")
    f.create_dataset("rows", data=x.astype(dtype))
    return f["rows"]


def sorted_result(scores: np.ndarray, rows: np.ndarray):
    order = np.lexsort((rows, -scores), axis=-1)
    return np.take_along_axis(scores, order, 1), np.take_along_axis(rows, order, 1)


@pytest.mark.parametrize("method", ["tracin", "retrac"])
def test_ondisk_answers_like_the_in_ram_ivf(tmp_path, method):
    x = clustered(N, D, method, seed=5)
    target = 0.8 if method == "tracin" else 0.95
    rows = ChunkedRows(h5_rows(tmp_path, x), chunk_rows=700)
    od = build_ondisk(rows, tmp_path / "od.faiss", method, target, part_rows=1000)
    info = od.info
    assert info["kind"] == "ondisk" and info["meets_target"] and info["mmap"]
    assert info["ondisk"]["partial_indexes"] == 3  # 1400 + 1400 + 199 rows
    assert (tmp_path / "od.faiss.ivfdata").stat().st_size == info["ondisk"]["bytes"]

    # the in-RAM IVF of the search layer: same training sample, same queries, same knobs
    ram = VectorIndex.build(x, method, kind="ivf", target_recall=target)
    assert ram.info["factory"] == info["factory"] and ram.info["knobs"] == info["knobs"]
    q = np.concatenate(
        [
            np.random.default_rng(1).standard_normal((13, D)).astype(np.float32),
            x[::331] + 0.1 * np.random.default_rng(2).standard_normal((10, D)).astype(np.float32),
        ]
    )
    a, b = ram.search(q, 10), od.search(q, 10)
    np.testing.assert_array_equal(a.rows, b.rows)
    np.testing.assert_allclose(a.scores, b.scores, rtol=1e-5, atol=1e-5)

    # an independent in-RAM IVF over the same centroids, opened with plain FAISS
    plain = faiss.read_index(str(tmp_path / "od.faiss"), faiss.IO_FLAG_ONDISK_SAME_DIR)
    ivf = faiss.extract_index_ivf(plain)
    centroids = ivf.quantizer.reconstruct_n(0, ivf.nlist)
    quantizer = faiss.IndexFlatIP(D)
    quantizer.add(centroids)
    ref = faiss.IndexIVFFlat(quantizer, D, ivf.nlist, faiss.METRIC_INNER_PRODUCT)
    ref.add(x)
    ref.nprobe = info["knobs"]["nprobe"]
    assert ivf.nprobe == ref.nprobe  # the tuned knob is stored in the FAISS file
    scores, found = sorted_result(*ref.search(q, 10))
    np.testing.assert_array_equal(b.rows, found)
    np.testing.assert_allclose(b.scores, scores, rtol=1e-5, atol=1e-5)
    # and recall against numpy brute force is what the build measured, roughly
    exact_scores, _ = brute_force(q, x, 10)
    true = np.einsum("bd,bkd->bk", q.astype(np.float64), x[b.rows].astype(np.float64))
    assert (true >= exact_scores[:, -1:] - 1e-4).mean() >= target - 0.15


@pytest.mark.parametrize("k", [1, 7, 40])
def test_exact_search_equals_brute_force(tmp_path, monkeypatch, k):
    x = clustered(N, D, "tracin", seed=k)
    keep = np.flatnonzero(np.random.default_rng(k).random(N) > 0.1)  # some rows left out
    od = build_ondisk(
        ChunkedRows(h5_rows(tmp_path, x, "float16"), keep, chunk_rows=512),
        tmp_path / "t.faiss",
        "tracin",
        target_recall=0.8,
    )
    monkeypatch.setattr(faiss_index, "_CHUNK_BYTES", 1)  # exact search in chunks of 1024 rows
    q = np.random.default_rng(9).standard_normal((11, D)).astype(np.float32)
    res = od.search(q, k, exact=True)
    xs = x.astype(np.float16).astype(np.float32)[keep]
    scores, rows = brute_force(q, xs, k)
    np.testing.assert_array_equal(res.rows, rows)
    np.testing.assert_allclose(res.scores, scores, rtol=1e-5, atol=1e-4)


def test_moved_folder_opens_and_answers_the_same(tmp_path):
    x = clustered(N, D, "retrac", seed=2)
    (tmp_path / "a").mkdir()
    od = build_ondisk(x, tmp_path / "a" / "r.faiss", "retrac", part_rows=1500)
    q = np.random.default_rng(3).standard_normal((5, D)).astype(np.float32)
    before = od.search(q, 10)
    del od
    shutil.move(tmp_path / "a", tmp_path / "b")
    moved = VectorIndex.load(tmp_path / "b" / "r.faiss")
    after = moved.search(q, 10)
    np.testing.assert_array_equal(before.rows, after.rows)
    np.testing.assert_array_equal(before.scores, after.scores)
    with pytest.warns(UserWarning, match="inverted lists are on disk"):
        assert moved.to_gpu() is False  # never copied whole to a GPU
    np.testing.assert_array_equal(moved.search(q, 10).rows, before.rows)
    with pytest.raises(SearchError, match="saved where it is built"):
        moved.save(tmp_path / "c.faiss")
    del moved
    data = tmp_path / "b" / "r.faiss.ivfdata"
    with open(data, "r+b") as f:
        f.truncate(data.stat().st_size - 8)
    with pytest.raises(IndexStateError, match="truncated or from another build"):
        VectorIndex.load(tmp_path / "b" / "r.faiss")
    data.unlink()
    with pytest.raises(IndexStateError, match="r.faiss.ivfdata: missing"):
        VectorIndex.load(tmp_path / "b" / "r.faiss")


def test_interrupted_build_leaves_nothing_that_opens(tmp_path, monkeypatch):
    x = clustered(N, D, "tracin", seed=4)
    path = tmp_path / "t.faiss"
    # killed in the add loop: 5 reads of 600 rows train the quantizer, the 7th read fails
    with pytest.raises(KeyboardInterrupt):
        build_ondisk(ChunkedRows(Recorder(x, fail_at=6), chunk_rows=600), path, "tracin")
    assert list(tmp_path.iterdir()) == []  # no index, no lists, no working folder
    with pytest.raises(IndexStateError, match="no index file"):
        VectorIndex.load(path)

    # over a finished index: an interrupted rebuild leaves the old one whole
    q = np.random.default_rng(0).standard_normal((4, D)).astype(np.float32)
    old = build_ondisk(x, path, "tracin", 0.8, part_rows=1000).search(q, 5, exact=True)
    for fail in ("chunks", "tune"):
        if fail == "tune":  # after the merge, before anything is moved into place
            monkeypatch.setattr(ondisk.st, "tune", lambda *a, **k: 1 / 0)
            src = ChunkedRows(2 * x)
        else:
            src = ChunkedRows(Recorder(2 * x, fail_at=8), chunk_rows=600)
        with pytest.raises((KeyboardInterrupt, ZeroDivisionError)):
            build_ondisk(src, path, "tracin")
        assert sorted(p.name for p in tmp_path.iterdir()) == [
            "t.faiss",
            "t.faiss.ivfdata",
            "t.faiss.json",
        ]
        again = VectorIndex.load(path).search(q, 5, exact=True)
        np.testing.assert_array_equal(again.rows, old.rows)
        np.testing.assert_array_equal(again.scores, old.scores)


def test_missed_target_probes_every_list_or_raises(tmp_path):
    x = clustered(N, D, "tracin", seed=8)  # heavy-tailed norms: IVF misses 0.99 within budget
    with pytest.warns(UserWarning, match="probing every list instead"):
        od = build_ondisk(x, tmp_path / "t.faiss", "tracin", target_recall=0.99)
    assert od.info["fallback"]["action"] == "fallback"
    assert od.info["knobs"] == {"nprobe": od.info["ondisk"]["nlist"]}
    q = np.random.default_rng(4).standard_normal((9, D)).astype(np.float32)
    scores, rows = brute_force(q, x, 10)
    res = od.search(q, 10)  # approximate path, every list probed: exact
    np.testing.assert_array_equal(res.rows, rows)
    np.testing.assert_allclose(res.scores, scores, rtol=1e-5, atol=1e-5)
    with pytest.raises(SearchError, match="reached recall@10"):
        build_ondisk(x, tmp_path / "u.faiss", "tracin", target_recall=0.99, on_miss="raise")
    assert not (tmp_path / "u.faiss").exists() and not (tmp_path / "u.faiss.ivfdata").exists()


def test_reads_never_exceed_a_chunk(tmp_path):
    x = clustered(5001, 16, "retrac", seed=6)
    data = Recorder(x)
    od = build_ondisk(ChunkedRows(data, chunk_rows=600), tmp_path / "r.faiss", "retrac")
    assert max(data.sizes) <= 600
    # every row is read for training (5001 < 10 000 sample rows), adding, exact validation
    assert sum(data.sizes) >= 3 * 5001
    assert od.info["ondisk"]["train_rows"] == 5001 and od.ntotal == 5001


def test_bad_input(tmp_path):
    x = clustered(300, 8, "tracin")
    with pytest.raises(SearchError, match="unknown method"):
        build_ondisk(x, tmp_path / "a.faiss", "cosine")
    with pytest.raises(SearchError, match="nlist=500 is more than the 300 rows"):
        build_ondisk(x, tmp_path / "a.faiss", "tracin", nlist=500)
    with pytest.raises(SearchError, match="NaN or inf"):
        build_ondisk(np.where(x > 2, np.nan, x), tmp_path / "a.faiss", "tracin")
    with pytest.raises(IndexStateError, match="no such folder"):
        build_ondisk(x, tmp_path / "nope" / "a.faiss", "tracin")
    with pytest.raises(SearchError, match="kind 'ondisk' is built from rows read in chunks"):
        VectorIndex.build(x, "tracin", kind="ondisk")
    assert not any(p.name.endswith(".parts") for p in tmp_path.iterdir())


def test_auto_goes_on_disk_only_past_the_memory_budget(monkeypatch):
    monkeypatch.setattr(ondisk.st, "available_memory", lambda: 1000 * 64 * 4)
    assert ondisk.wants_ondisk("ondisk", 10, 4)
    assert not ondisk.wants_ondisk("auto", 500, 64) and ondisk.wants_ondisk("auto", 501, 64)
    assert not ondisk.wants_ondisk("ivf", 10**9, 512)


# -- through the index folder and the CLI ------------------------------------------------------


def test_cli_build_info_query_move(tmp_path, saved_checkpoints):
    images = np.random.default_rng(0).random((23, 1, 8, 8), dtype=np.float32)
    np.save(tmp_path / "train.npy", images)
    out = tmp_path / "idx"
    ckpt_args = [a for c in saved_checkpoints for a in ("-c", c)]
    spec = ["--proj-dim", "32", "--timesteps", "2", "--batch-size", "8"]
    res = run(
        "build",
        *ckpt_args,
        "--data",
        tmp_path / "train.npy",
        "--out",
        out,
        *spec,
        "--index",
        "ondisk",
        "--json",
    )
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["indexes"]["retrac"]["kind"] == "ondisk"
    manifest = json.loads((out / "manifest.json").read_text())
    assert (
        "tracin.faiss.ivfdata" in manifest["files"] and "retrac.faiss.ivfdata" in manifest["files"]
    )

    shutil.move(out, tmp_path / "moved")
    res = run("info", tmp_path / "moved")
    assert res.exit_code == 0, res.output
    assert "on disk      tracin: lists in tracin.faiss.ivfdata" in res.output
    idx = gi.AttributionIndex.open(tmp_path / "moved")
    np.savez(tmp_path / "q.npz", **idx.embed(images))
    # a real process: FAISS prints from C on file descriptor 1, which must stay clean JSON
    cmd = [sys.executable, "-m", "gradindex.cli", "query", tmp_path / "moved", tmp_path / "q.npz"]
    proc = subprocess.run(
        [str(c) for c in [*cmd, "--vectors", "-k", "3", "--json"]],
        capture_output=True,
        text=True,
        check=True,
    )
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert "IO_FLAG_ONDISK_SAME_DIR" in proc.stderr  # FAISS's message, moved to stderr
    for m in ("tracin", "retrac"):
        x = idx.vectors(m)
        q = idx.embed(images)[m]
        scores, rows = brute_force(q, x, 3)
        got = [r for r in records if r["method"] == m]
        np.testing.assert_array_equal([r["rows"] for r in got], rows)  # few rows: all lists probed
        exact = idx.search(q, 3, m, exact=True)
        np.testing.assert_array_equal(exact.rows, rows)
        np.testing.assert_allclose(exact.scores, scores, rtol=1e-5, atol=1e-5)
    del idx

    (tmp_path / "moved" / "retrac.faiss.ivfdata").unlink()
    res = run("info", tmp_path / "moved")
    lines = [ln for ln in res.output.splitlines() if ln.startswith("Error:")]
    assert res.exit_code == 1 and len(lines) == 1
    assert "retrac.faiss.ivfdata: missing" in lines[0]


def test_interrupted_folder_build_is_incomplete_then_resumes(
    tmp_path, saved_checkpoints, monkeypatch
):
    images = np.random.default_rng(1).random((9, 1, 8, 8), dtype=np.float32)
    spec = gi.BuildSpec(proj_dim=16, timesteps=2, batch_size=5)
    kw = dict(
        checkpoints=saved_checkpoints,
        data=images,
        out=tmp_path / "i",
        spec=spec,
        index="ondisk",
        progress=False,
    )
    real = ondisk._fill_parts
    monkeypatch.setattr(ondisk, "_fill_parts", lambda *a: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        gi.build_index(**kw)
    with pytest.raises(IndexStateError, match="incomplete index"):
        gi.AttributionIndex.open(tmp_path / "i")
    monkeypatch.setattr(ondisk, "_fill_parts", real)
    idx = gi.build_index(**kw, resume=True)
    assert idx.info()["indexes"]["tracin"]["kind"] == "ondisk"
    q = np.random.default_rng(2).standard_normal((3, idx.dim)).astype(np.float32)
    for m in ("tracin", "retrac"):
        scores, rows = brute_force(q, idx.vectors(m), 4)
        res = idx.search(q, 4, m)
        np.testing.assert_array_equal(res.rows, rows)
        np.testing.assert_allclose(res.scores, scores, rtol=1e-5, atol=1e-5)


def test_merged_shards_get_an_ondisk_index(tmp_path, saved_checkpoints):
    from gradindex.build.shards import merge_shards

    images = np.random.default_rng(3).random((8, 1, 8, 8), dtype=np.float32)
    spec = gi.BuildSpec(proj_dim=16, timesteps=2, batch_size=4)
    for i in range(2):
        gi.build_index(checkpoints=saved_checkpoints, data=images, out=tmp_path / f"s{i}",
                       spec=spec, index="ondisk", shard=(i, 2), progress=False)  # fmt: skip
        assert not list((tmp_path / f"s{i}").glob("*.ivfdata"))  # shards are exact flat
    idx = merge_shards(tmp_path / "m", [tmp_path / "s0", tmp_path / "s1"])
    assert {m["kind"] for m in idx.info()["indexes"].values()} == {"ondisk"}
    q = np.random.default_rng(5).standard_normal((3, idx.dim)).astype(np.float32)
    for m in ("tracin", "retrac"):
        scores, rows = brute_force(q, idx.vectors(m), 5)
        res = idx.search(q, 5, m)
        np.testing.assert_array_equal(res.rows, rows)
        np.testing.assert_allclose(res.scores, scores, rtol=1e-5, atol=1e-5)


def _resident_kib(suffix: str) -> int:
    """Resident KiB of this process's mappings of files ending in ``suffix`` (/proc smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if "-" in head[0] and len(head) >= 5:  # a mapping's header line
                inside = head[-1].endswith(suffix)
            elif inside and head[0] == "Rss:":
                total += int(head[1])
    return total


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")
def test_searches_leave_no_list_pages_resident(tmp_path):
    """Resident memory of a memory-mapped index must not grow with the lists searched: an
    exact search touches every list, and afterwards none of the lists file is resident in the
    process (still in the page cache), while a second search answers the same."""
    x = clustered(N, D, "retrac", seed=4)
    build_ondisk(x, tmp_path / "r.faiss", "retrac")
    od = VectorIndex.load(tmp_path / "r.faiss")
    size_kib = (tmp_path / "r.faiss.ivfdata").stat().st_size // 1024
    q = np.random.default_rng(5).standard_normal((6, D)).astype(np.float32)
    ivf = faiss.extract_index_ivf(od._index)
    ivf.nprobe = ivf.nlist
    od._index.search(q, 10)  # FAISS alone, every list probed: all of them stay resident
    assert _resident_kib(".ivfdata") >= 0.9 * size_kib
    first = od.search(q, 10, exact=True)
    assert _resident_kib(".ivfdata") == 0
    again = od.search(q, 10, exact=True)
    np.testing.assert_array_equal(first.rows, again.rows)
    np.testing.assert_array_equal(first.rows, brute_force(q, x, 10)[1])
    od.search(q, 10)  # every list probed (nprobe = nlist above), a few at a time
    assert _resident_kib(".ivfdata") == 0


@pytest.mark.parametrize("budget", [1, 40_000, 1 << 30])
def test_probing_lists_a_few_at_a_time_answers_like_one_search(tmp_path, budget):
    """search_bounded's groups of lists (one list each at budget 1, all at once at 1 GiB)
    give FAISS's own answer at the index's nprobe, for a batch of queries."""
    x = clustered(N, D, "tracin", seed=6)
    build_ondisk(x, tmp_path / "t.faiss", "tracin", target_recall=0.9)
    od = VectorIndex.load(tmp_path / "t.faiss")
    ivf = faiss.extract_index_ivf(od._index)
    ivf.nprobe = 10  # of 76 lists
    q = np.random.default_rng(7).standard_normal((9, D)).astype(np.float32)
    want = sorted_result(*od._index.search(q, 12))
    got = sorted_result(*search_bounded(od._index, q, 12, budget))
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    if budget == 1:
        assert len(_groups(ivf, ivf.quantizer.search(q, ivf.nprobe)[1], budget)) == ivf.nprobe
    ivf.nprobe = ivf.nlist + 5  # set by hand past nlist: FAISS probes every list
    got = sorted_result(*search_bounded(od._index, q, 12, budget))
    np.testing.assert_array_equal(got[1], brute_force(q, x, 12)[1])
