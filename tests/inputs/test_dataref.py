"""inputs/dataref.py: the user's ``data`` told apart once, and read the same way everywhere."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

import gradindex as gi
from gradindex.inputs.dataref import DataRef, parse_data
from gradindex.inputs.query_images import load_images
from gradindex.inputs.sources import ArraySource
from gradindex.inputs.training_data import open_source
from gradindex.serve.images import TrainingImages
from tests.conftest import scheduler, tiny_unet

PIXELS = (np.random.default_rng(4).random((5, 1, 8, 8)) * 255).astype(np.uint8)


def _files(root: Path) -> dict[str, tuple[str, Path | None]]:
    """One of each file kind under ``root``: what to pass → (kind, the path it names)."""
    root.mkdir(parents=True, exist_ok=True)
    np.save(root / "a.npy", PIXELS)
    np.savez(root / "a.npz", images=PIXELS)
    with h5py.File(root / "a.h5", "w") as f:
        f["grp/images"] = PIXELS
    Image.fromarray(PIXELS[0, 0]).save(root / "one.png")
    (root / "pics").mkdir()
    Image.fromarray(PIXELS[1, 0]).save(root / "pics" / "x.png")
    (root / "saved").mkdir()
    (root / "saved" / "state.json").write_text("{}")  # a save_to_disk folder's marker
    (root / "hub" / "data").mkdir(parents=True)
    (root / "hub" / "data" / "train-00000-of-00001.parquet").write_bytes(b"")
    (root / "t.parquet").write_bytes(b"")
    return {
        str(root / "a.npy"): ("npy", root / "a.npy"),
        str(root / "a.npz"): ("npz", root / "a.npz"),
        f"{root / 'a.h5'}:/grp/images": ("h5", root / "a.h5"),
        str(root / "one.png"): ("image", root / "one.png"),
        str(root / "pics"): ("folder", root / "pics"),
        str(root / "saved"): ("hf", root / "saved"),
        str(root / "hub"): ("parquet", root / "hub"),
        str(root / "t.parquet"): ("parquet", root / "t.parquet"),
        str(root / "s-{000..003}.tar"): ("tar", None),
        str(root / "one.tar"): ("tar", None),
    }


def test_each_kind_of_data_is_told_apart(tmp_path):
    for given, (kind, path) in _files(tmp_path).items():
        ref = parse_data(given)
        assert (ref.kind, ref.path, ref.given) == (kind, path, given)
        assert parse_data(Path(given)) == ref  # a Path reads as its text
    h5 = parse_data(f"{tmp_path / 'a.h5'}:/grp/images")
    assert h5.dataset == "/grp/images"
    assert h5.location == f"{(tmp_path / 'a.h5').resolve()}:/grp/images"
    assert parse_data(str(tmp_path / "s-{000..003}.tar")).pattern == str(
        tmp_path / "s-{000..003}.tar"
    )
    in_memory = {
        "array": PIXELS,
        "tensor": torch.from_numpy(PIXELS),
        "list of arrays": list(PIXELS),
    }
    for given, data in in_memory.items():
        ref = parse_data(data)
        assert (ref.kind, ref.given, ref.location) == ("array", given, None)
        np.testing.assert_array_equal(ref.value, PIXELS)
    source = ArraySource(PIXELS)
    assert parse_data(source).kind == "source" and parse_data(source).value is source


def test_a_dataref_passes_through_unchanged(tmp_path):
    ref = parse_data(PIXELS)
    assert parse_data(ref) is ref
    assert parse_data(DataRef("npy", "x", path=tmp_path / "nowhere.npy")).path.name == "nowhere.npy"


@pytest.mark.parametrize(
    ("given", "words"),
    [
        ("missing.npy", "missing.npy: no such file or folder"),
        ("d.h5", "d.h5: name the dataset, e.g. 'd.h5:/images'"),
        ("notes.txt", "notes.txt: unsupported file type; give an array, a .npy/.npz file"),
        ({"images": 1}, "cannot read images from a dict: give an array"),
        (3, "cannot read images from a int: give an array"),
        ([np.zeros((1, 8, 8)), np.zeros((1, 4, 4))], "the images in the list differ in shape"),
    ],
)
def test_bad_data_is_one_line_saying_what_to_give(tmp_path, monkeypatch, given, words):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d.h5").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(gi.DataError) as err:
        parse_data(given)
    assert str(err.value).startswith(words) and "\n" not in str(err.value)


def test_an_h5_split_takes_the_file_that_exists():
    """'.h5:/' may appear in a folder's name; the split is after the file that exists."""
    ref = parse_data("/nowhere/x.h5:/a.h5:/images")  # neither exists: the first split
    assert (str(ref.path), ref.dataset) == ("/nowhere/x.h5", "/a.h5:/images")


def test_a_colon_in_the_folder_name_reads_the_same_everywhere(tmp_path):
    """``run:/d.h5:/images`` (a folder named 'run:'): build, the manifest's data_source, the
    viewer and the query reader all read the HDF5 dataset in it (they each split at the first
    ':/' before, so the build said 'no such file or folder' and the viewer 'no longer there')."""
    folder = tmp_path / "run:"
    folder.mkdir()
    with h5py.File(folder / "d.h5", "w") as f:
        f["images"] = PIXELS
    given = f"{folder / 'd.h5'}:/images"
    ref = parse_data(given)
    assert (ref.kind, ref.path, ref.dataset) == ("h5", folder / "d.h5", "/images")
    np.testing.assert_array_equal(open_source(given).read(0, 5), PIXELS)
    np.testing.assert_array_equal(load_images(given)[0], PIXELS)
    idx = gi.build_index(
        checkpoints=[(tiny_unet(1), scheduler())],
        data=given,
        out=tmp_path / "idx",
        spec=gi.BuildSpec(proj_dim=8, timesteps=1, batch_size=8),
        progress=False,
        fidelity_sample=0,
    )
    manifest = json.loads((idx.path / "manifest.json").read_text())
    assert manifest["data_source"] == f"{(folder / 'd.h5').resolve()}:/images"
    shown = TrainingImages(manifest["data_source"], 5, 1, None)
    assert shown.available, shown.problem
    np.testing.assert_array_equal(shown.image(3), PIXELS[3])


def test_an_image_folder_named_with_a_colon_shows_in_the_viewer(tmp_path):
    folder = tmp_path / "pics:" / "train"
    folder.mkdir(parents=True)
    for i, p in enumerate(PIXELS):
        Image.fromarray(p[0]).save(folder / f"{i}.png")
    shown = TrainingImages(str(folder), 5, 1, None)
    assert shown.available, shown.problem
    np.testing.assert_array_equal(shown.image(2), PIXELS[2])
    gone = TrainingImages(str(tmp_path / "pics:" / "gone"), 5, 1, None)
    assert "no longer there" in gone.problem


def _reads_per_row(monkeypatch, path: Path, n: int, **build) -> np.ndarray:
    """How many times each row of the ``.npy`` at ``path`` is read by a build of it."""
    from gradindex.inputs.sources import NpySource

    counts = np.zeros(n, np.int64)
    real = NpySource._read

    def counted(self, start: int, stop: int) -> np.ndarray:
        counts[start:stop] += 1
        return real(self, start, stop)

    monkeypatch.setattr(NpySource, "_read", counted)
    gi.build_index(
        checkpoints=[(tiny_unet(1), scheduler())],
        data=str(path),
        spec=gi.BuildSpec(proj_dim=8, timesteps=1, batch_size=4),
        progress=False,
        fidelity_sample=0,
        **build,
    )
    return counts


def test_a_uint8_image_is_read_once_on_its_way_to_its_row(tmp_path, monkeypatch):
    """uint8 pixels cannot be NaN or outside 0..255: their rows are read once, as they are
    featurized (the first one once more, checked before anything is written); float rows twice
    (one pass for their range and NaN). They were read twice and three times."""
    np.save(tmp_path / "u8.npy", np.repeat(PIXELS, 2, axis=0))  # 10 rows
    counts = _reads_per_row(monkeypatch, tmp_path / "u8.npy", 10, out=tmp_path / "a")
    assert counts.tolist() == [2] + [1] * 9
    floats = np.repeat(PIXELS, 2, axis=0).astype(np.float32) / 255
    np.save(tmp_path / "f.npy", floats)  # one pass finds the range and checks every row
    counts = _reads_per_row(monkeypatch, tmp_path / "f.npy", 10, out=tmp_path / "f")
    assert counts.tolist() == [3] + [2] * 9  # it was 3 for every row: range, check, featurize
    floats[7, 0, 3, 3] = np.nan
    np.save(tmp_path / "f.npy", floats)
    with pytest.raises(gi.DataError, match="NaN"):
        _reads_per_row(monkeypatch, tmp_path / "f.npy", 10, out=tmp_path / "b")
    assert not (tmp_path / "b" / "vectors.h5").exists()  # refused before writing
