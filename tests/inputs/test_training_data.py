"""inputs/training_data.py: a build's training rows opened, cut to a shard and checked."""

from __future__ import annotations

import numpy as np
import pytest

import gradindex as gi
from gradindex.inputs.dataref import parse_data
from gradindex.inputs.encoders import Conditioner
from gradindex.inputs.models import load_checkpoints
from gradindex.inputs.training_data import open_training
from tests.conftest import scheduler, tiny_unet

SPEC = gi.BuildSpec(proj_dim=8, timesteps=1)


@pytest.fixture(scope="module")
def conditioner():
    ckpts = load_checkpoints([(tiny_unet(1), scheduler())])
    return Conditioner.for_checkpoints(ckpts), ckpts[0].sample_shape()


def _open(data, conditioner, ids=None, shard=None, spec=SPEC):
    cond, shape = conditioner
    return open_training(parse_data(data), ids, {}, spec, cond, shape, shard, {})


def test_a_shard_reads_its_rows_in_the_whole_data_sets_range(tmp_path, conditioner):
    """Shard 1 of 2 holds rows 5..9 with their ids; its value range is the whole data set's
    (rows 5..9 alone, in [0.1, 0.5], would read as another range)."""
    data = np.linspace(-1, 1, 10 * 64, dtype=np.float32).reshape(10, 1, 8, 8)
    data[5:] = np.linspace(0.1, 0.5, 5 * 64).reshape(5, 1, 8, 8)
    np.save(tmp_path / "f.npy", data)
    whole_spec, whole = _open(str(tmp_path / "f.npy"), conditioner)
    spec, rows = _open(str(tmp_path / "f.npy"), conditioner, shard=(1, 2))
    alone, _ = _open(data[5:], conditioner)
    assert spec.data_range == whole_spec.data_range != alone.data_range
    np.testing.assert_array_equal(rows.images.read(0, 5), data[5:])
    assert rows.ids.tolist() == [5, 6, 7, 8, 9] and len(whole.images) == 10
    assert {k: rows.shard[k] for k in ("index", "count", "start", "stop", "total_rows")} == {
        "index": 1, "count": 2, "start": 5, "stop": 10, "total_rows": 10
    }  # fmt: skip
    assert rows.source == str((tmp_path / "f.npy").resolve()) and rows.prep["size"] == (8, 8)


@pytest.mark.parametrize(
    ("ids", "words"),
    [(["a", "b"], "ids has shape (2,) but there are 3 images"), (["a", "a", "b"], "not unique")],
)
def test_ids_are_one_per_image_and_unique(conditioner, ids, words):
    with pytest.raises(gi.SpecError, match=words.replace("(", r"\(").replace(")", r"\)")):
        _open(np.zeros((3, 1, 8, 8), np.uint8), conditioner, ids=ids)


def test_a_float_row_with_nan_is_refused_before_anything_is_read_again(conditioner):
    data = np.zeros((6, 1, 8, 8), np.float32)
    data[4, 0, 1, 1] = np.inf
    with pytest.raises(gi.DataError, match="1 image.s. contain NaN or infinite"):
        _open(data, conditioner)
    rgb = np.zeros((2, 3, 8, 8), np.uint8)  # uint8: the first row's shape is checked
    with pytest.raises(gi.DataError, match="3 channel.s. but the model takes 1"):
        _open(rgb, conditioner)
