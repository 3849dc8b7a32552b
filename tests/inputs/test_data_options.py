"""How --data is read, from the CLI to the browser: a dataset's columns named by flags, bad
samples skipped by a flag, both recorded in the manifest so `gradindex serve` reads the training
images as the build did (tar shards and datasets included)."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from click.testing import CliRunner

import gradindex as gi
from gradindex.build.write import _report_waiting
from gradindex.cli.main import main
from gradindex.serve.images import TrainingImages
from gradindex.store.vectors import VectorStore
from tests.inputs.test_sources import _digits, _hf_dataset, _png, write_tars

N = 24


@pytest.fixture(scope="module")
def pixels_labels():
    pixels, labels = _digits()
    return pixels[:N], labels[:N]


def _build_args(ckpt, data, out, *extra):
    return ["build", "-c", str(ckpt), "--proj-dim", "16", "--timesteps", "1", "--data", data,
            "--out", str(out), "--fidelity-sample", "0", *extra]  # fmt: skip


def test_dataset_columns_named_by_flags_reach_the_rows_ids_and_the_browser(
    pixels_labels, tmp_path, saved_checkpoints
):
    pixels, labels = pixels_labels
    ds = _hf_dataset(pixels, labels).rename_columns({"image": "picture", "id": "key"})
    ds.save_to_disk(str(tmp_path / "ds"))
    np.save(tmp_path / "same.npy", pixels[:, None])
    run = CliRunner().invoke
    res = run(main, _build_args(saved_checkpoints[0], str(tmp_path / "ds"), tmp_path / "no"))
    assert (
        res.exit_code != 0 and res.output.startswith("Error: ") and "--image-column" in res.output
    )
    assert len(res.output.strip().splitlines()) == 1
    flags = ["--image-column", "picture", "--id-column", "key"]
    res = run(main, _build_args(saved_checkpoints[0], str(tmp_path / "ds"), tmp_path / "i", *flags))
    assert res.exit_code == 0, res.output
    res = run(main, _build_args(saved_checkpoints[0], str(tmp_path / "same.npy"), tmp_path / "n"))
    assert res.exit_code == 0, res.output
    idx, ref = gi.AttributionIndex.open(tmp_path / "i"), gi.AttributionIndex.open(tmp_path / "n")
    assert list(idx.ids) == [f"{i:04d}" for i in range(N)]  # the dataset's own ids, as strings
    for method in ("tracin", "retrac"):
        np.testing.assert_allclose(idx.vectors(method), ref.vectors(method), atol=1e-5)
    manifest = json.loads((tmp_path / "i" / "manifest.json").read_text())
    assert manifest["data_options"] == {"image_column": "picture", "id_column": "key"}
    assert manifest["data_source"] == str((tmp_path / "ds").resolve())
    shown = TrainingImages(manifest["data_source"], N, 1, None, manifest["data_options"])
    assert shown.available, shown.problem
    for row in (0, 7, N - 1):
        np.testing.assert_array_equal(shown.image(row)[0], pixels[row])


def test_on_error_skip_leaves_a_corrupt_file_out_and_raise_names_it(
    pixels_labels, tmp_path, saved_checkpoints
):
    pixels, _ = pixels_labels
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, p in enumerate(pixels):
        (folder / f"{i:03d}.png").write_bytes(_png(p))
    (folder / "005.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    run = CliRunner().invoke
    res = run(main, _build_args(saved_checkpoints[0], str(folder), tmp_path / "a"))
    assert res.exit_code != 0 and res.output.startswith("Error: ") and "005.png" in res.output
    assert len(res.output.strip().splitlines()) == 1
    res = run(main, _build_args(saved_checkpoints[0], str(folder), tmp_path / "b", "--on-error",
                                "skip"))  # fmt: skip
    assert res.exit_code == 0, res.output
    idx = gi.AttributionIndex.open(tmp_path / "b")
    want = [f"{i:03d}.png" for i in range(N) if i != 5]
    assert list(idx.ids) == want  # ids not shifted: row r is still its own file
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["data_options"] == {"on_error": "skip"}
    shown = TrainingImages(manifest["data_source"], N - 1, 1, None, manifest["data_options"])
    np.testing.assert_array_equal(shown.image(5)[0], pixels[6])  # the row after the gap


@pytest.mark.parametrize("fmt", ("tar", "parquet"))
def test_the_browser_reads_training_images_from_tars_and_parquet_by_row(
    pixels_labels, tmp_path, fmt
):
    pixels, labels = pixels_labels
    if fmt == "tar":
        source = write_tars(tmp_path, pixels, labels)
    else:
        source = str(tmp_path / "d.parquet")
        _hf_dataset(pixels, labels).to_parquet(source)
    shown = TrainingImages(source, N, 1, None)
    assert shown.available, shown.problem
    for row in (0, 9, N - 1):
        np.testing.assert_array_equal(shown.image(row)[0], pixels[row])
    gone = TrainingImages(str(tmp_path / "gone-{0..1}.tar"), N, 1, None)
    assert not gone.available and "gone-0.tar" in gone.problem


def test_a_file_that_breaks_mid_build_is_named_and_a_resume_after_fixing_it_finishes(
    pixels_labels, tmp_path, saved_checkpoints
):
    """Decoded files are checked as they are featurized (not in a pass before): a PNG cut
    short stops the build at its batch with one line naming it; the batches before it stay
    committed, the folder never looks complete, and the fixed file resumes to the same rows
    as an array build."""
    pixels, _ = pixels_labels
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, p in enumerate(pixels):
        (folder / f"{i:03d}.png").write_bytes(_png(p))
    whole = _png(pixels[13])
    (folder / "013.png").write_bytes(whole[: whole.index(b"IDAT") + 8])  # header whole, pixels cut
    spec = gi.BuildSpec(proj_dim=16, timesteps=1, batch_size=8)
    build = dict(checkpoints=[saved_checkpoints[0]], spec=spec, progress=False, fidelity_sample=0)
    with pytest.raises(gi.DataError) as err:
        gi.build_index(data=str(folder), out=tmp_path / "a", **build)
    message = str(err.value)
    assert "013.png: not a readable image" in message and "--resume" in message
    assert "\n" not in message
    assert not (tmp_path / "a" / "manifest.json").exists()
    with VectorStore.open(tmp_path / "a" / "vectors.h5") as store:
        np.testing.assert_array_equal(store.done, np.arange(N) < 8)  # batch 8-15 not written
    (folder / "013.png").rename(folder / "013b.png")  # "replaced" under another name: refused
    (folder / "013b.png").write_bytes(_png(pixels[13]))
    with pytest.raises(gi.IndexStateError, match=r"row 13 was '013\.png' but the data now has "
                       r"'013b\.png' there"):  # fmt: skip
        gi.build_index(data=str(folder), out=tmp_path / "a", resume=True, **build)
    (folder / "013b.png").rename(folder / "013.png")  # repaired in place
    idx = gi.build_index(data=str(folder), out=tmp_path / "a", resume=True, **build)
    ref = gi.build_index(data=pixels[:, None], out=tmp_path / "ref", **build)
    assert list(idx.ids) == [f"{i:03d}.png" for i in range(N)]
    for method in ("tracin", "retrac"):
        np.testing.assert_allclose(idx.vectors(method), ref.vectors(method), atol=1e-5)
    took = idx.manifest["data_seconds"]  # this run's: the 16 rows the resume featurized
    assert 0 <= took["waiting_s"] <= took["featurizing_s"] and took["reading_s"] > 0


def test_a_build_that_mostly_waited_for_its_data_says_so(caplog):
    with caplog.at_level(logging.INFO, logger="gradindex.build.write"):
        _report_waiting({"featurizing_s": 40.0, "waiting_s": 3.0, "reading_s": 3.5})
        assert "featurizing took 40.0 s, of which 3.0 s waiting" in caplog.text
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
        _report_waiting({"featurizing_s": 40.0, "waiting_s": 25.0, "reading_s": 39.0})
    (warned,) = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert "waited 25 s of 40 s for the training data" in warned.getMessage()
