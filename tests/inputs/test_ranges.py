"""A query image's value range is its own: never decided by the images beside it in a batch;
an explicit range is applied to every image it is given for, or refused (uint8 is 0..255)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from diffusers import DDPMPipeline

import gradindex as gi
from tests.conftest import assert_rows_close, error_line, run, scheduler, tiny_unet

SPEC = gi.BuildSpec(proj_dim=32, timesteps=2, batch_size=4)


def top(res) -> list[list[int]]:
    """Each query's top-k ids from `gradindex query --json`."""
    assert res.exit_code == 0, res.output
    return [json.loads(ln)["ids"] for ln in res.output.splitlines() if ln.startswith("{")]


@pytest.fixture(scope="module")
def signed_index(tmp_path_factory):
    """An index over 12 float training images in [-1, 1] (diffusers' training normalization),
    its pipeline folder, the training images and one image the pipeline generated ([0, 1])."""
    root = tmp_path_factory.mktemp("signed")
    pipe = DDPMPipeline(unet=tiny_unet(5), scheduler=scheduler())
    pipe.save_pretrained(root / "ckpt")
    train = np.random.default_rng(4).uniform(-1, 1, (12, 1, 8, 8)).astype(np.float32)
    gi.build_index(checkpoints=[root / "ckpt"], data=train, out=root / "idx", spec=SPEC,
                   progress=False)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    gen = pipe(1, num_inference_steps=3, output_type="np").images  # [1, 8, 8, 1] in [0, 1]
    gen = np.ascontiguousarray(np.asarray(gen, np.float32).transpose(0, 3, 1, 2))
    assert gen.min() >= 0 and gen.max() <= 1
    return gi.AttributionIndex.open(root / "idx"), root, train, gen


def test_a_generated_image_answers_the_same_alone_or_in_a_batch(signed_index, tmp_path):
    """The probe's case: a generated image queried alone, then together with a training
    image (values in [-1, 1]); the batch's values must not change how the first is read."""
    idx, root, train, gen = signed_index
    alone, pair = tmp_path / "alone.npy", tmp_path / "pair.npy"
    np.save(alone, gen)
    np.save(pair, np.concatenate([gen, train[:1]]))
    want = top(run("query", root / "idx", alone, "-k", 10, "--method", "tracin", "--json"))
    line = error_line(run("query", root / "idx", pair, "-k", 10, "--method", "tracin", "--json"))
    assert "image 0 in [0, 1]" in line and "image 1 in [-1, 1]" in line
    assert "--data-range" in line
    # each alone: its own range; with a partner in the same range: the same embedding and top-10
    others = np.concatenate([gen, np.clip(gen[:, :, ::-1] * 0.9 + 0.05, 0, 1)])
    np.save(pair, others)
    got = top(run("query", root / "idx", pair, "-k", 10, "--method", "tracin", "--json"))
    assert got[0] == want[0]
    assert_rows_close(idx.embed(others)["tracin"][:1], idx.embed(gen)["tracin"])
    # the training image alone is read in its own [-1, 1] and finds itself first
    assert idx.query(train[:1], k=1, method="retrac").ids[0, 0] == 0
    with pytest.raises(gi.DataError, match=r"images 0, 2 in \[0, 1\]; image 1 in \[-1, 1\]"):
        idx.embed(np.concatenate([gen, train[:1], gen]))


def test_values_within_0_1_on_a_signed_index_are_warned_about(signed_index):
    idx, _, train, gen = signed_index
    with pytest.warns(UserWarning, match=r"read as \[0, 1\].*data-range -1 1"):
        idx.embed(gen)
    bright = np.abs(train[:1])  # a [-1, 1] image that happens to have no negative pixel
    stored = idx.vectors("tracin")[:1]
    with pytest.warns(UserWarning):
        assert not np.allclose(idx.embed(bright)["tracin"], stored, atol=1e-3)
    assert_rows_close(idx.embed(train[:1], data_range=(-1, 1))["tracin"], stored)


def test_an_explicit_range_on_uint8_queries_is_refused_and_floats_agree(signed_index, tmp_path):
    """uint8 pixels are 0..255: --data-range 0 1 on them was silently ignored; the same pixels
    as floats with their range give the uint8 answer."""
    idx, root, _, _ = signed_index
    pixels = np.random.default_rng(8).integers(0, 256, (2, 1, 8, 8), dtype=np.uint8)
    q = tmp_path / "q.npy"
    np.save(q, pixels)
    base = ["query", root / "idx", q, "-k", 5, "--method", "tracin", "--json"]
    want = top(run(*base))
    line = error_line(run(*base, "--data-range", 0, 1))
    assert "uint8" in line and "[0, 1]" in line
    assert top(run(*base, "--data-range", 0, 255)) == want
    for floats, given in (
        (pixels / np.float32(255), ("0", "1")),
        (pixels * np.float32(1), ("0", "255")),
    ):
        np.save(q, floats.astype(np.float32))
        assert top(run(*base, "--data-range", *given)) == want
    with pytest.raises(gi.DataError, match="uint8"):
        idx.embed(pixels, data_range=(0, 1))


def test_an_explicit_range_on_uint8_training_data_is_refused(tmp_path):
    pixels = np.random.default_rng(9).integers(0, 256, (3, 1, 8, 8), dtype=np.uint8)
    with pytest.raises(gi.DataError, match=r"uint8 .* given as \[0, 1\]"):
        gi.build_index(checkpoints=[(tiny_unet(5), scheduler())], data=pixels,
                       out=tmp_path / "i", spec=SPEC.replace(data_range=(0.0, 1.0)),
                       progress=False)  # fmt: skip
    assert not (tmp_path / "i" / "manifest.json").exists()
