"""store/factors.py: factors.h5 written and read back exactly (hand-made factors), refused when
missing, of another build or of another checkpoint count, readable with plain h5py."""

from __future__ import annotations

import json

import h5py
import pytest
import torch

from gradindex.errors import IndexStateError
from gradindex.featurize.kfac import CheckpointFactors, LayerFactors
from gradindex.store.factors import load_factors, write_factors
from gradindex.store.layout import FACTORS


def _factors(seed: int) -> CheckpointFactors:
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    layers = []
    for name, cols, (out, inp) in (("down.0.conv", (0, 12), (3, 4)), ("mid.lin", (15, 21), (2, 3))):
        lay = LayerFactors(name, cols, (out, inp), r(inp, inp), r(out, out))
        lay.QA, lay.QS, lay.eig = r(inp, inp), r(out, out), r(out, inp)
        layers.append(lay)
    return CheckpointFactors(layers, r(21), {"down.0.bias": (12, 15)}, samples=7)


def _same(a: CheckpointFactors, b: CheckpointFactors) -> None:
    assert a.diag_slices == b.diag_slices and a.samples == b.samples
    torch.testing.assert_close(a.diag, b.diag, rtol=0, atol=0)
    for x, y in zip(a.layers, b.layers, strict=True):
        assert (x.name, x.cols, x.shape) == (y.name, y.cols, y.shape)
        for key in ("A", "S", "QA", "QS", "eig"):
            torch.testing.assert_close(getattr(x, key), getattr(y, key), rtol=0, atol=0)


def test_factors_round_trip_exactly_and_are_plain_h5py(tmp_path):
    written = [_factors(0), _factors(1)]
    path = write_factors(tmp_path, written, "build-1")
    assert path == tmp_path / FACTORS and not (tmp_path / f".{FACTORS}.tmp").exists()
    manifest = {"factors": {}, "checkpoints": [{}, {}], "build_id": "build-1"}
    for a, b in zip(written, load_factors(tmp_path, manifest), strict=True):
        _same(a, b)
    with h5py.File(path, "r") as f:  # the documented layout
        assert f.attrs["build_id"] == "build-1" and f.attrs["samples"] == 7
        assert f["c1/mid/lin/eig"].shape == (2, 3)
        assert json.loads(f["c0/diag"].attrs["slices"]) == {"down.0.bias": [12, 15]}


def test_factors_of_another_build_or_count_or_none_are_refused(tmp_path):
    write_factors(tmp_path, [_factors(0)], "build-1")
    fix = f"gradindex factors {tmp_path} --data TRAINING_DATA"
    with pytest.raises(IndexStateError, match=f"build id build-1 but the manifest's is b2.*{fix}"):
        load_factors(tmp_path, {"factors": {}, "checkpoints": [{}], "build_id": "b2"})
    with pytest.raises(IndexStateError, match="not 2 checkpoints"):
        load_factors(tmp_path, {"factors": {}, "checkpoints": [{}, {}], "build_id": "build-1"})
    with pytest.raises(IndexStateError, match="has no influence factors"):
        load_factors(tmp_path, {"checkpoints": [{}], "build_id": "build-1"})  # not recorded
    (tmp_path / FACTORS).unlink()
    with pytest.raises(IndexStateError, match="has no influence factors"):
        load_factors(tmp_path, {"factors": {}, "checkpoints": [{}], "build_id": "build-1"})


def test_a_failed_write_leaves_no_file(tmp_path):
    bad = _factors(0)
    bad.layers[0].QA = None  # cannot be written
    with pytest.raises((TypeError, AttributeError)):
        write_factors(tmp_path, [bad], "b")
    assert list(tmp_path.iterdir()) == []
