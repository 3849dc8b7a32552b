"""A bfloat16 index: the precision recorded in the manifest and shown by info, and every later
embedding with the index's spec (query, add) computed in it; an index without the field reads
as float32; a bad value is a one-line error."""

from __future__ import annotations

import json

import numpy as np
import pytest

import gradindex as gi
from gradindex.build.append import add_samples
from gradindex.store.describe import format_info
from gradindex.store.layout import MANIFEST
from tests.conftest import error_line, run

SPEC = gi.BuildSpec(proj_dim=64, timesteps=2, noise_draws=2, batch_size=4, precision="bfloat16")


def _build(tmp_path, checkpoints, images, spec=SPEC, name="idx"):
    return gi.build_index(
        checkpoints=checkpoints,
        data=images,
        out=tmp_path / name,
        spec=spec,
        progress=False,
        fidelity_sample=0,
    )


def _rel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.linalg.norm(a - b, axis=1) / np.linalg.norm(b, axis=1)


def test_a_query_on_a_bfloat16_index_reproduces_the_stored_rows(
    tmp_path, saved_checkpoints, images
):
    """Training images embedded by the reopened index equal their stored rows to 1e-5, which
    float32 rows of the same images are not (2e-3 apart): the query computes in bfloat16."""
    idx = gi.AttributionIndex.open(_build(tmp_path, saved_checkpoints, images).path)
    emb = idx.embed(images)
    plain = _build(tmp_path, saved_checkpoints, images, SPEC.replace(precision="float32"), "f32")
    for method in ("tracin", "retrac"):
        stored = idx.vectors(method)
        assert _rel(emb[method], stored).max() <= 1e-5, method
        assert _rel(plain.vectors(method), stored).min() > 2e-3, method


def test_add_featurizes_new_images_in_the_recorded_precision(tmp_path, saved_checkpoints, images):
    """Adding the last 3 images to a bfloat16 index of the first 4 stores the rows a bfloat16
    build of all 7 stores."""
    whole = _build(tmp_path, saved_checkpoints, images, name="whole")
    half = _build(tmp_path, saved_checkpoints, images[:4], name="half")
    idx = add_samples(half.path, images[4:], progress=False)
    for method in ("tracin", "retrac"):
        assert _rel(idx.vectors(method), whole.vectors(method)).max() <= 1e-5, method


def test_manifest_and_info_record_the_precision_and_old_indexes_read_float32(
    tmp_path, saved_checkpoints, images
):
    idx = _build(tmp_path, saved_checkpoints, images)
    spec = json.loads((idx.path / MANIFEST).read_text())["spec"]
    assert spec["precision"] == "bfloat16"
    assert gi.AttributionIndex.open(idx.path).spec.precision == "bfloat16"
    assert any(line.endswith("computed in bfloat16") for line in format_info(idx.info()))
    # an index written before the field had no precision in its manifest: float32 (and its
    # fingerprint leaves a float32 precision out, so such indexes keep theirs)
    old = _build(tmp_path, saved_checkpoints, images[:2], SPEC.replace(precision="float32"), "old")
    manifest = json.loads((old.path / MANIFEST).read_text())
    assert manifest["spec"].pop("precision") == "float32"  # written: 'auto' is the default now
    (old.path / MANIFEST).write_text(json.dumps(manifest))
    assert gi.AttributionIndex.open(old.path).spec.precision == "float32"
    assert any(line.endswith("computed in float32") for line in format_info(old.info()))
    assert SPEC.fingerprint() != SPEC.replace(precision="float32").fingerprint()


def test_cli_records_precision_and_refuses_a_bad_one(tmp_path, saved_checkpoints, images):
    data = tmp_path / "train.npy"
    np.save(data, images[:3])
    ckpt = ("-c", saved_checkpoints[0])
    common = (*ckpt, "--data", data, "--proj-dim", 16, "--timesteps", 1, "--fidelity-sample", 0)
    res = run("build", *common, "--out", tmp_path / "a", "--precision", "bfloat16")
    assert res.exit_code == 0, res.output
    res = run("info", tmp_path / "a")
    assert "computed in bfloat16" in res.output, res.output
    res = run("build", *common, "--out", tmp_path / "b", "--precision", "half")
    assert res.exit_code == 2 and "Invalid value for '--precision'" in res.output
    config = tmp_path / "spec.json"
    config.write_text(json.dumps({"precision": "half"}))
    res = run("build", *common, "--out", tmp_path / "c", "--config", config)
    assert error_line(res) == (
        "Error: --config " + str(config) + ": BuildSpec.precision='half': must be one of "
        "auto, float32, bfloat16"
    )
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("value", ["float16", "", None, 16])
def test_a_bad_precision_value_is_a_spec_error(value):
    with pytest.raises(
        gi.SpecError, match=r"^BuildSpec\.precision=.*must be one of auto, float32, bfloat16$"
    ):
        gi.BuildSpec(precision=value)
