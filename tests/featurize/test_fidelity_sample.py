"""A small build keeps its fidelity sample's full-space features from its own featurizing
(gradindex.featurize.fidelity_sample) instead of featurizing the sample again, with the same
record as featurizing again gives."""

from __future__ import annotations

import errno
import warnings

import numpy as np
import pytest
import torch

import gradindex as gi
import gradindex.build.write
import gradindex.featurize.fidelity
from gradindex.featurize.fidelity_sample import HeldSample, draw_sample
from gradindex.featurize.gradients import GradientFeaturizer
from gradindex.store.vectors import VectorStore
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


def _assert_same_record(got: dict, want: dict) -> None:
    assert got["reference"] == want["reference"] == "exact" and got["rows"] == want["rows"]
    for m in ("tracin", "retrac"):
        for key, value in want[m].items():
            assert got[m][key] == pytest.approx(value, abs=1e-6), (m, key)


def test_a_resumed_build_featurizes_the_sample_rows_it_did_not_keep(tmp_path, monkeypatch):
    """Killed after its first batch (disk full), the resumed build featurizes only the other
    rows, so it holds only some of the sample: it featurizes the sample again, and its record
    is the uninterrupted build's."""
    models = [tiny_unet(s) for s in (1, 2)]
    whole, calls = _counted_build(tmp_path / "whole", monkeypatch, SPEC, models, 7)
    assert len(calls) == 6
    original = VectorStore.write_rows
    writes = {"n": 0}

    def failing(self, *args):
        writes["n"] += 1
        if writes["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, *args)

    monkeypatch.setattr(VectorStore, "write_rows", failing)
    with pytest.raises(gi.IndexStateError, match="disk full"):
        _counted_build(tmp_path / "resumed", monkeypatch, SPEC, models, 7)
    monkeypatch.setattr(VectorStore, "write_rows", original)
    resumed, calls = _counted_build(tmp_path / "resumed", monkeypatch, SPEC, models, 7, resume=True)
    assert sum(calls) > 2 * 5  # rows 4..8 of both checkpoints, and the sample again
    _assert_same_record(resumed, whole)


def test_a_flagged_row_changes_the_draw_and_the_sample_is_featurized_again(tmp_path, monkeypatch):
    """A flagged row leaves the usable rows, so the sample drawn from them is not the one
    drawn from all rows before featurizing: the kept features are not used, and the record
    is that of the same build that never kept any."""
    original = GradientFeaturizer.featurize

    def poisoned(self, x0, draws, cond=None, **kw):
        f = original(self, x0, draws, cond, **kw)
        f.tracin[x0.flatten(1)[:, 0] > 0.9] = float("nan")  # a bright first pixel: flagged
        return f

    imgs = np.random.default_rng(3).random((9, 1, 8, 8), dtype=np.float32) * 0.9
    imgs[4, 0, 0, 0] = 1.0
    models = [tiny_unet(s) for s in (1, 2)]
    got = {}
    for mode in ("kept", "never kept"):
        if mode == "never kept":
            monkeypatch.setattr(gradindex.build.write, "hold_sample", lambda *args: None)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            monkeypatch.setattr(GradientFeaturizer, "featurize", poisoned)
            idx = gi.build_index(
                checkpoints=[(m, scheduler()) for m in models], data=imgs,
                out=tmp_path / mode, spec=SPEC, progress=False, fidelity_sample=7,
            )  # fmt: skip
        assert idx.info()["num_flagged"] == 1
        got[mode] = idx.info()["fidelity"]
    assert 4 not in got["kept"]["rows"]
    _assert_same_record(got["kept"], got["never kept"])
