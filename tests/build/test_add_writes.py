"""gradindex add: the new images' value range is their own (as a build of them would read it, or
--data-range); a full disk or an unwritable folder is one line with advice add can follow, and
the index is left as it was."""

from __future__ import annotations

import errno
import json

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

import gradindex as gi
from gradindex.build import shards
from gradindex.build.append import add_samples
from gradindex.cli.main import main
from gradindex.search.faiss_index import VectorIndex
from gradindex.store import kernel, lifecycle
from gradindex.store.vectors import VectorStore
from tests.build.test_shards import SPEC, assert_same_index, whole_build


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return whole_build(tmp_path_factory.mktemp("add_writes"), image_seed=5)


def _signed_half(setup, name):
    """The first 5 images as floats in [-1, 1]: the same model inputs as the whole build's."""
    root, ckpts, images, _ = setup
    return gi.build_index(checkpoints=ckpts, data=images[:5] * 2 - 1, out=root / name,
                          spec=SPEC, progress=False, fidelity_sample=0)  # fmt: skip


def _snapshot(path):
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def _error_line(res) -> str:
    lines = [ln for ln in res.output.splitlines() if ln.startswith("Error:")]
    assert res.exit_code == 1 and len(lines) == 1, res.output
    assert "Traceback" not in res.output and isinstance(res.exception, SystemExit)
    return lines[0]


def test_add_reads_float_0_1_images_in_their_own_range(setup):
    """The probe's case: [0, 1] floats added to an index built from [-1, 1] floats: the new
    rows must be those a fresh build of the same images stores (here: the whole build's)."""
    _, _, images, whole = setup
    half = _signed_half(setup, "signed")
    assert half.spec.data_range == (-1.0, 1.0)
    with pytest.warns(UserWarning, match=r"read as \[0, 1\].*--data-range -1 1"):
        idx = add_samples(half.path, images[5:], progress=False)
    assert_same_index(idx, whole)
    assert idx.manifest["added"][0]["data_range"] == [0.0, 1.0]
    res = idx.query(images[5:], k=1, method="retrac")  # the new samples find themselves
    np.testing.assert_array_equal(res.ids[:, 0], np.arange(5, 9))


def test_cli_add_takes_data_range(setup, tmp_path):
    _, _, images, whole = setup
    half = _signed_half(setup, "signed_cli")
    data = tmp_path / "more.npy"
    np.save(data, images[5:] * np.float32(2))  # 0..2: no range a build would guess
    line = _error_line(CliRunner().invoke(main, ["add", str(half.path), str(data)]))
    assert "--data-range LOW HIGH" in line
    res = CliRunner().invoke(
        main, ["add", str(half.path), str(data), "--data-range", "0", "2", "--json"]
    )
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["num_rows"] == 9
    assert_same_index(gi.AttributionIndex.open(half.path), whole)


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def _h5py_flush(*args, **kwargs):  # what h5py raises when HDF5's flush hits a full disk
    raise RuntimeError(
        "Unable to synchronously flush file (file write failed: time = Sun Dec  6 12:47:25 2026\n"
        ", filename = 'vectors.h5', file descriptor = 5, errno = 28, error message = 'No space "
        "left on device', buf = 0x1, total write size = 2048, bytes this sub-write = 2048, bytes "
        "actually written = 18446744073709551615, offset = 0)"
    )


def _nth_call(func, n, fail):
    calls = []

    def wrapped(*args, **kwargs):
        calls.append(1)
        return fail(*args, **kwargs) if len(calls) == n else func(*args, **kwargs)

    return wrapped


# where the disk fills: (object, attribute, which call fails, how it fails)
FILL_POINTS = {
    "new rows": (VectorStore, "write_rows", 1, _enospc),
    "new rows, h5py flush": (h5py.File, "flush", 1, _h5py_flush),
    "copied rows": (VectorStore, "write_rows", 3, _enospc),  # 2 batches of new rows, then copy
    "search index": (VectorIndex, "save", 3, _enospc),  # after the new rows' two
    "kernel": (kernel, "_write", 2, _enospc),
    "manifest": (shards, "write_json_atomic", 1, _enospc),
}


@pytest.mark.parametrize("where", list(FILL_POINTS))
def test_disk_full_during_add_is_one_line_and_leaves_the_index(setup, tmp_path, monkeypatch, where):
    root, _, images, _ = setup
    half = _signed_half(setup, f"full_{where.replace(' ', '_').replace(',', '')}")
    before = _snapshot(half.path)
    data = tmp_path / "more.npy"
    np.save(data, images[5:])
    owner, name, n, fail = FILL_POINTS[where]
    monkeypatch.setattr(owner, name, _nth_call(getattr(owner, name), n, fail))
    line = _error_line(CliRunner().invoke(main, ["add", str(half.path), str(data)]))
    monkeypatch.undo()
    assert "disk full" in line and "nothing was added" in line
    assert "run the same add again" in line and "--resume" not in line
    assert _snapshot(half.path) == before
    assert not [p for p in root.iterdir() if p.name.startswith(f".{half.path.name}.")]
    assert len(gi.AttributionIndex.open(half.path)) == 5


def test_add_beside_an_unwritable_folder_says_what_to_make_writable(setup, tmp_path, monkeypatch):
    _, _, images, _ = setup
    half = _signed_half(setup, "locked_out")
    data = tmp_path / "more.npy"
    np.save(data, images[5:])

    def refused(path, target):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(lifecycle, "_acquire", refused)
    line = _error_line(CliRunner().invoke(main, ["add", str(half.path), str(data)]))
    assert "--out" not in line
    assert f"make {half.path.parent} writable" in line


def test_build_disk_full_in_an_h5py_flush_is_one_line(setup, tmp_path, monkeypatch):
    """The same HDF5 failure in a build: one line with the build's own advice (--resume)."""
    _, ckpts, images, _ = setup
    monkeypatch.setattr(h5py.File, "flush", _nth_call(h5py.File.flush, 1, _h5py_flush))
    with pytest.raises(gi.IndexStateError, match=r"writing failed \(disk full\).*--resume"):
        gi.build_index(checkpoints=ckpts, data=images, out=tmp_path / "b", spec=SPEC,
                       progress=False)  # fmt: skip
