"""search/ondisk_io.py and search/gpu.py: an on-disk IVF made by hand with faiss, opened, searched
and released (answers equal brute force before and after), refused when its lists file does not
match; and the reasons an index stays off the GPU."""

from __future__ import annotations

import os
import shutil

import faiss
import numpy as np
import pytest

from gradindex.errors import IndexStateError
from gradindex.search.gpu import clone_to_gpus, gpu_unavailable
from gradindex.search.ondisk_io import (
    IVFDATA_SUFFIX,
    fsync,
    read_ondisk,
    release_pages,
    stdout_to_stderr,
)


@pytest.fixture
def ondisk(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 8)).astype(np.float32)
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(8), 8, 8, faiss.METRIC_INNER_PRODUCT)
    index.train(x)
    path = tmp_path / "tracin.faiss"
    lists = faiss.OnDiskInvertedLists(8, index.code_size, str(path) + IVFDATA_SUFFIX)
    index.replace_invlists(lists, False)
    with stdout_to_stderr():
        index.add(x)
    faiss.write_index(index, str(path))
    size = os.path.getsize(str(path) + IVFDATA_SUFFIX)
    return path, x, {"ondisk": {"ivfdata": path.name + IVFDATA_SUFFIX, "bytes": size}}, lists


def test_an_ondisk_index_answers_like_brute_force_before_and_after_release(ondisk, capfd):
    path, x, info, _ = ondisk
    index = read_ondisk(path, info)
    assert capfd.readouterr().out == ""  # FAISS's printf went to stderr
    lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists)
    assert isinstance(lists, faiss.OnDiskInvertedLists) and lists.prefetch_nthread == 0
    faiss.extract_index_ivf(index).nprobe = 8  # every list: exact
    q = x[[3, 77]] + 0.1
    want = np.argsort(-(q @ x.T), axis=1, kind="stable")[:, :5]
    for _ in range(2):
        _, ids = index.search(q, 5)
        np.testing.assert_array_equal(ids, want)
        release_pages(index)  # unmapped, read back on the next touch: nothing lost


def test_a_missing_or_mismatched_lists_file_is_refused(ondisk, tmp_path):
    path, _, info, _ = ondisk
    bad = {"ondisk": {**info["ondisk"], "bytes": info["ondisk"]["bytes"] + 1}}
    with pytest.raises(IndexStateError, match="bytes but tracin.faiss.json records"):
        read_ondisk(path, bad)
    moved = tmp_path / "moved"
    moved.mkdir()
    shutil.copy(path, moved / path.name)  # the lists file left behind
    with pytest.raises(IndexStateError, match="missing; an on-disk index needs its lists file"):
        read_ondisk(moved / path.name, info)


def test_stdout_to_stderr_moves_c_level_output_and_restores_it(capfd):
    with stdout_to_stderr():
        os.write(1, b"from C\n")
    os.write(1, b"after\n")
    out, err = capfd.readouterr()
    assert out == "after\n" and err == "from C\n"


def test_fsync_flushes_an_existing_file_and_refuses_a_missing_one(tmp_path):
    (tmp_path / "f").write_bytes(b"x")
    fsync(tmp_path / "f")
    with pytest.raises(FileNotFoundError):
        fsync(tmp_path / "nope")


def test_indexes_faiss_gpu_cannot_hold_say_why(ondisk):
    path, x, info, _ = ondisk
    hnsw = faiss.IndexHNSWFlat(8, 8, faiss.METRIC_INNER_PRODUCT)
    assert "no GPU version of IndexHNSWFlat" in gpu_unavailable(hnsw)
    assert clone_to_gpus(hnsw, None) == (None, gpu_unavailable(hnsw))
    assert "inverted lists are on disk" in gpu_unavailable(read_ondisk(path, info))
    flat = faiss.IndexFlatIP(8)
    reason = gpu_unavailable(flat)
    if faiss.get_num_gpus() if hasattr(faiss, "StandardGpuResources") else 0:
        assert reason is None
    else:  # this machine: CPU faiss, or faiss-gpu without a device
        assert reason in (
            'this faiss has no GPU support (pip install "gradindex[gpu]" on a CUDA machine)',
            "faiss-gpu sees no CUDA device",
        )
        assert clone_to_gpus(flat, None) == (None, reason)
