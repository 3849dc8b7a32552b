"""A folder whose files were altered after the build is never answered from in silence.

One flipped byte in the ids of ``vectors.h5`` or in ``tracin.faiss`` (a plain open used to
answer wrong, only ``info --verify`` noticed); HDF5 links, external storage or virtual datasets
that make open and query read files outside the folder; symlink loops, a named pipe for the
manifest, and manifest numbers that no file backs."""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

import gradindex as gi
from gradindex.cli.main import main
from gradindex.errors import IndexStateError
from gradindex.spec import BuildSpec
from gradindex.store.layout import file_records
from tests.conftest import scheduler, tiny_unet


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A finished flat index of 6 images (ids 0..5) and the images."""
    root = tmp_path_factory.mktemp("untrusted")
    images = np.random.default_rng(0).random((6, 1, 8, 8), dtype=np.float32)
    spec = BuildSpec(proj_dim=64, timesteps=2, batch_size=6)
    gi.build_index(
        checkpoints=[(tiny_unet(1), scheduler())],
        data=images,
        out=root / "idx",
        spec=spec,
        progress=False,
    )
    return root / "idx", images


@pytest.fixture
def folder(built, tmp_path):
    return shutil.copytree(built[0], tmp_path / "idx")


def flip(path: Path, offset: int, mask: int = 0x01) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ mask]))


def cli(*args: str):
    return CliRunner().invoke(main, list(map(str, args)))


# -- item 7: one flipped byte --------------------------------------------------------------------


def test_flipped_byte_in_the_ids_is_refused_when_read(folder):
    with h5py.File(folder / "vectors.h5", "r") as f:
        offset = f["ids"].id.get_offset()
        assert f["ids"][3] == 3
    flip(folder / "vectors.h5", offset + 3 * 8)  # id of row 3: 3 -> 2 (two rows named 2)
    with h5py.File(folder / "vectors.h5", "r") as f:
        assert list(f["ids"][()]) == [0, 1, 2, 2, 4, 5]  # what a plain read answers
    idx = gi.AttributionIndex.open(folder)  # open stays cheap: nothing hashed yet
    row3 = idx.vectors("tracin")[3]
    with pytest.raises(IndexStateError, match=r"vectors\.h5: ids of rows 0\.\.5 differ"):
        idx.search(row3, k=1, method="tracin")
    with pytest.raises(IndexStateError, match="differ from the manifest's digest"):
        np.asarray(idx.ids)


def test_flipped_byte_in_the_ids_fails_a_cli_query(folder):
    with h5py.File(folder / "vectors.h5", "r") as f:
        offset = f["ids"].id.get_offset()
        np.save(folder.parent / "q.npy", f["tracin"][3:4])
    flip(folder / "vectors.h5", offset + 3 * 8)
    res = cli(
        "query", folder, folder.parent / "q.npy", "--vectors", "--method", "tracin", "-k", "2"
    )
    assert res.exit_code == 1
    assert res.output.splitlines() == [
        f"Error: {folder / 'vectors.h5'}: ids of rows 0..5 differ from the manifest's digest "
        "(the file was altered or corrupted); restore the index's own file or rebuild it"
    ]


def test_string_ids_changed_in_place_are_refused(tmp_path):
    images = np.random.default_rng(1).random((4, 1, 8, 8), dtype=np.float32)
    src = tmp_path / "imgs"
    src.mkdir()
    from PIL import Image

    for i, im in enumerate(images):
        Image.fromarray((im[0] * 255).astype(np.uint8)).save(src / f"img{i}.png")
    spec = BuildSpec(proj_dim=32, timesteps=2, batch_size=4)
    out = tmp_path / "idx"
    gi.build_index(
        checkpoints=[(tiny_unet(1), scheduler())], data=src, out=out, spec=spec, progress=False
    )
    with h5py.File(out / "vectors.h5", "r+") as f:
        f["ids"][1] = "img2.png"  # rows 1 and 2 now claim one file
    idx = gi.AttributionIndex.open(out)
    with pytest.raises(IndexStateError, match="ids of rows 0..3 differ"):
        idx.ids[[0]]


def test_flipped_byte_in_the_faiss_file_is_refused_on_open(folder):
    idx = gi.AttributionIndex.open(folder)
    rows = idx.vectors("tracin")
    n, d = rows.shape
    size = (folder / "tracin.faiss").stat().st_size
    # flat storage is the file's last n*d float32; row 1 is one the open's row sample skips
    flip(folder / "tracin.faiss", size - (n - 1) * d * 4 + 3, 0x40)  # an exponent byte
    with pytest.raises(IndexStateError, match=r"tracin\.faiss: its checksum differs"):
        gi.AttributionIndex.open(folder)
    res = cli("query", folder, folder / "missing.npy", "--vectors")
    assert res.exit_code == 1
    assert res.output.startswith(f"Error: {folder / 'tracin.faiss'}: its checksum differs")


def test_untouched_index_answers_like_numpy(folder):
    idx = gi.AttributionIndex.open(folder)
    rows = idx.vectors("tracin")
    res = idx.search(rows[2:4], k=6, method="tracin")
    expect = np.argsort(-(rows[2:4] @ rows.T), axis=1, kind="stable")
    assert np.array_equal(np.sort(res.ids, axis=1), np.sort(expect, axis=1))
    assert np.array_equal(res.ids[:, 0], expect[:, 0])


# -- item 8: HDF5 indirection out of the folder -----------------------------------------------


def _outside_ids(tmp_path: Path) -> Path:
    """A file outside the index holding other ids (the order reversed)."""
    outside = tmp_path / "outside.h5"
    with h5py.File(outside, "w") as f:
        f["ids"] = np.arange(6, dtype=np.int64)[::-1]
    return outside


def _external_link(f: h5py.File, outside: Path) -> None:
    f["ids"] = h5py.ExternalLink(str(outside), "/ids")


def _external_storage(f: h5py.File, outside: Path) -> None:
    raw = outside.with_suffix(".raw")
    raw.write_bytes(np.arange(6, dtype="<i8")[::-1].tobytes())
    f.create_dataset("ids", shape=(6,), dtype="<i8", external=[(str(raw), 0, 6 * 8)])


def _virtual(f: h5py.File, outside: Path) -> None:
    layout = h5py.VirtualLayout(shape=(6,), dtype="<i8")
    layout[:] = h5py.VirtualSource(str(outside), "ids", shape=(6,))
    f.create_virtual_dataset("ids", layout)


@pytest.mark.parametrize(
    "make,what",
    [
        (_external_link, "is an external link"),
        (_external_storage, "is stored in external files"),
        (_virtual, "is a virtual dataset"),
    ],
)
def test_ids_read_from_outside_the_folder_are_refused(folder, tmp_path, make, what):
    outside = _outside_ids(tmp_path)
    with h5py.File(folder / "vectors.h5", "r+") as f:
        del f["ids"]
        make(f, outside)
    with h5py.File(folder / "vectors.h5", "r") as f:  # plain h5py follows it out of the folder
        assert list(f["ids"][()]) == [5, 4, 3, 2, 1, 0]
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"] = file_records(folder)  # checksums recomputed: --verify cannot tell
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IndexStateError, match=rf"vectors\.h5: /ids {what}, not data stored"):
        gi.AttributionIndex.open(folder)
    res = cli("info", folder, "--verify")
    assert res.exit_code == 1
    assert res.output.splitlines() == [
        f"Error: {folder / 'vectors.h5'}: /ids {what}, not data stored in the file; an index "
        "reads nothing outside its folder: rebuild the index"
    ]


def test_soft_link_inside_the_file_is_refused_too(folder):
    with h5py.File(folder / "vectors.h5", "r+") as f:
        f["ids_copy"] = f["ids"][()]
        del f["ids"]
        f["ids"] = h5py.SoftLink("/ids_copy")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"] = file_records(folder)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IndexStateError, match=r"/ids is a soft link"):
        gi.AttributionIndex.open(folder)


# -- item 13: loops, pipes and numbers no file backs -------------------------------------------


@pytest.mark.parametrize("name", ["vectors.h5", "tracin.faiss"])
def test_symlink_loop_in_the_folder_is_one_line(folder, name):
    (folder / name).unlink()
    os.symlink(name + ".other", folder / name)
    os.symlink(name, folder / (name + ".other"))  # name -> name.other -> name
    with pytest.raises(IndexStateError, match="a symlink loop"):
        gi.AttributionIndex.open(folder)
    res = cli("info", folder)
    assert res.exit_code == 1
    assert res.output.splitlines() == [
        f"Error: {folder / name}: a symlink loop; put the index's own file in its place"
    ]


def test_named_pipe_as_manifest_is_refused_without_reading(folder):
    (folder / "manifest.json").unlink()
    os.mkfifo(folder / "manifest.json")
    stop = threading.Event()

    def writer() -> None:  # unblocks a reader (with an empty manifest), never anyone else
        while not stop.wait(0.05):
            try:
                fd = os.open(folder / "manifest.json", os.O_WRONLY | os.O_NONBLOCK)
            except OSError:
                continue
            os.close(fd)

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        res = cli("info", folder)
    finally:
        stop.set()
        thread.join()
    assert res.exit_code == 1
    assert res.output.splitlines() == [
        f"Error: {folder / 'manifest.json'}: a named pipe, not a regular file; put the "
        "index's own file there"
    ]


def _edit(folder: Path, **values) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest.update(values)
    (folder / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("shape", [[1, 1e5, 1e5], [1, 100000, 100000], [1, 8], [0, 8, 8]])
def test_image_shape_past_any_model_is_refused_on_open(folder, shape):
    _edit(folder, image_shape=shape)
    res = cli("info", folder)
    assert res.exit_code == 1
    assert res.output.splitlines() == [
        f"Error: {folder / 'manifest.json'}: image_shape is {json.dumps(shape)}, not [channels, "
        "height, width] of at most 32768 each; the manifest was altered: restore it or rebuild "
        "the index"
    ]


def test_image_shape_unlike_the_model_is_refused_before_resizing(folder, built, monkeypatch):
    _edit(folder, image_shape=[1, 4096, 4096], sample_shape=[1, 4096, 4096])
    idx = gi.AttributionIndex.open(folder, checkpoints=[(tiny_unet(1), scheduler())])
    resized = []
    monkeypatch.setattr(idx, "prepare", lambda *a, **k: resized.append(a))
    with pytest.raises(IndexStateError, match=r"sample_shape \[1, 4096, 4096\] but the checkp"):
        idx.query(built[1][:1], k=2, method="tracin")
    assert resized == []  # refused before any image was resized to the declared shape


@pytest.mark.parametrize(
    "key,value,shown", [("num_rows", 10**30, "1e+30"), ("dim", -3, "-3"), ("proj_dim", 2.5, "2.5")]
)
def test_huge_or_odd_counts_are_one_short_line(folder, key, value, shown):
    _edit(folder, **{key: value})
    res = cli("info", folder)
    assert res.exit_code == 1
    assert res.output.splitlines() == [
        f"Error: {folder / 'manifest.json'}: {key} is {shown}, not a count; the manifest was "
        "altered: restore it or rebuild the index"
    ]


def test_dim_unlike_checkpoints_times_proj_dim_is_refused(folder):
    _edit(folder, dim=128)
    with pytest.raises(IndexStateError, match=r"dim 128 is not 1 checkpoint\(s\) x proj_dim 64"):
        gi.AttributionIndex.open(folder)


def test_huge_numbers_in_manifest_records_are_shown_short(folder):
    _edit(folder, timesteps=[10**30, 5, 7, 9, 11, 13])
    res = cli("info", folder)
    assert res.exit_code == 1
    (line,) = res.output.splitlines()
    assert "records timesteps [1e+30, 5, 7, 9, ...] but the index's spec / vectors say [" in line
    assert len(line) < 250 + len(str(folder))


@pytest.mark.parametrize(
    "key,value,shown,what",
    [
        ("versions", None, "null", "a mapping"),
        ("indexes", {"tracin": 3}, '{"tracin": 3}', "a mapping of records"),
        ("conditioning", 5, "5", "a mapping"),
        ("run_records", 5, "5", "a mapping"),
        ("kernel", "x", "'x'", "a mapping"),
        ("kernel", {"rule": "r"}, '{"rule": "r"}', "a record with its rows and rule"),
    ],
)
def test_a_manifest_record_of_the_wrong_type_is_one_line(folder, key, value, shown, what):
    """Session 14 probe: a manifest with a record removed or of another type ended 'info' (and
    some queries) in a KeyError / TypeError traceback."""
    _edit(folder, **{key: value})
    line = (
        f"Error: {folder / 'manifest.json'}: {key} is {shown}, not {what}; the manifest was "
        "altered: restore it or rebuild the index"
    )
    for args in (("info", folder), ("query", folder, folder / "none.npy")):
        res = cli(*args)
        assert (res.exit_code, res.output.splitlines()) == (1, [line])
