"""A small build keeps its fidelity sample's full-space features from its own featurizing
(gradindex.featurize.fidelity_sample) instead of featurizing the sample again, with the same
record as featurizing again gives."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import gradindex as gi
import gradindex.featurize.fidelity
from gradindex.featurize.fidelity_sample import HeldSample, draw_sample
from gradindex.featurize.gradients import GradientFeaturizer
from tests.conftest import scheduler, tiny_unet

WEIGHTS = (1.0, 2.0)


def _counted_build(tmp_path, monkeypatch, spec, models, sample, **kwargs):
    """(fidelity record, batch sizes of every featurize call) of a build over 9 images."""
    calls = []
    featurize = GradientFeaturizer.featurize

    def counted(self, *args, **kw):
        calls.append(len(args[0]))
        return featurize(self, *args, **kw)

    monkeypatch.setattr(GradientFeaturizer, "featurize", counted)
    imgs = np.random.default_rng(3).random((9, 1, 8, 8), dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # below-the-bar warnings at this tiny size
        idx = gi.build_index(
            checkpoints=[(m, scheduler()) for m in models], data=imgs, out=tmp_path,
            spec=spec, progress=False, fidelity_sample=sample, **kwargs,
        )  # fmt: skip
    monkeypatch.setattr(GradientFeaturizer, "featurize", featurize)
    return idx.info()["fidelity"], calls


SPEC = gi.BuildSpec(proj_dim=64, timesteps=2, batch_size=4, checkpoint_weights=WEIGHTS, seed=3)


def test_a_small_build_does_not_featurize_its_sample_again(tmp_path, monkeypatch):
    """7 of 9 rows sampled, exact scores fitting: the only gradients are the build's own (two
    checkpoints, batches of 4, 4 and 1), and the reference is still exact."""
    models = [tiny_unet(s) for s in (1, 2)]
    fid, calls = _counted_build(tmp_path / "idx", monkeypatch, SPEC, models, 7)
    assert fid["reference"] == "exact" and fid["sample"] == 7
    assert sorted(calls) == [1, 1, 4, 4, 4, 4]


@pytest.mark.parametrize("labels", [False, True])
def test_kept_features_give_the_record_featurizing_again_gives(tmp_path, monkeypatch, labels):
    """The same build measured both ways: with room for every checkpoint's sample features
    (kept), and with room for only one checkpoint's at a time (featurized again after the
    build, as before): the same exact reference, the same figures."""
    spec, kw, extra = SPEC, {}, {}
    if labels:  # class-conditional models, another sample
        spec, kw, extra = (
            SPEC.replace(seed=5),
            {"labels": np.arange(9) % 3},
            {"num_class_embeds": 3},
        )
    models = [tiny_unet(s, **extra) for s in (1, 2)]
    p = sum(x.numel() for x in models[0].parameters())
    kept, calls = _counted_build(tmp_path / "kept", monkeypatch, spec, models, 7, **kw)
    assert len(calls) == 6
    one_checkpoint = 2 * 7 * p * 4  # both [S, p] matrices of one checkpoint, not two
    monkeypatch.setattr(gradindex.featurize.fidelity, "FULL_SPACE_BUDGET", one_checkpoint)
    again, calls = _counted_build(tmp_path / "again", monkeypatch, spec, models, 7, **kw)
    assert len(calls) > 6  # the sample featurized a second time
    assert kept["reference"] == again["reference"] == "exact" and kept["rows"] == again["rows"]
    for m in ("tracin", "retrac"):
        assert kept[m].keys() == again[m].keys()
        for key, value in again[m].items():
            assert kept[m][key] == pytest.approx(value, abs=1e-6), (m, key)
    assert kept["ok"] == again["ok"] and kept["suggested_proj_dim"] == again["suggested_proj_dim"]


def test_held_sample_keeps_exactly_the_sampled_rows_of_each_batch():
    """Batches of 3 over 10 rows: the held rows are the sampled rows of the full features,
    and the sample counts as covered only once every checkpoint's batches went by."""
    rows = draw_sample(7, np.arange(10), 4)
    assert len(set(rows.tolist())) == 4 and list(rows) == sorted(rows)
    assert np.array_equal(rows, draw_sample(7, np.arange(10), 4))  # the seed's rows
    full = torch.randn(2, 10, 5)  # [C, N, p]
    held = HeldSample.empty(rows, 2, 5)
    for c in range(2):
        assert not held.covers(rows)  # checkpoint c's features are not in yet
        for start in range(0, 10, 3):
            held.take(start, c, full[c, start : start + 3], -full[c, start : start + 3])
    assert held.covers(rows) and not held.covers(np.sort(draw_sample(8, np.arange(10), 4)))
    np.testing.assert_array_equal(held.tracin, full[:, rows].numpy())
    np.testing.assert_array_equal(held.retrac, -full[:, rows].numpy())
    assert HeldSample.nbytes(2, 4, 5) == held.tracin.nbytes + held.retrac.nbytes
