"""merge refuses shards cut from other data or from the same data in another order: their row
ranges would name other images (ids are row numbers)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from click.testing import CliRunner

import gradindex as gi
from gradindex.build.shards import merge_shards
from gradindex.cli.main import main
from gradindex.store.layout import MANIFEST, read_manifest, write_json_atomic
from tests.build.test_shards import SPEC, whole_build


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return whole_build(tmp_path_factory.mktemp("shard_data"), image_seed=11)


def _shard(setup, data, i, n, name):
    root, ckpts, _, _ = setup
    return gi.build_index(checkpoints=ckpts, data=data, out=root / name, spec=SPEC,
                          shard=(i, n), progress=False, fidelity_sample=0)  # fmt: skip


def test_shards_of_the_same_data_in_another_order_are_refused(setup):
    """The probe's case: shard 0 from the data, shard 1 from the same images shuffled."""
    root, _, images, whole = setup
    shuffled = images[np.random.default_rng(1).permutation(len(images))]
    a = _shard(setup, images, 0, 2, "ordered0")
    b = _shard(setup, shuffled, 1, 2, "shuffled1")
    res = CliRunner().invoke(main, ["merge", str(root / "m"), str(a.path), str(b.path)])
    lines = [ln for ln in res.output.splitlines() if ln.startswith("Error:")]
    assert res.exit_code == 1 and len(lines) == 1, res.output
    assert "another order" in lines[0] and "shuffled1" in lines[0]
    assert not (root / "m" / MANIFEST).exists()
    # the same order: every training image finds itself first in the merged index
    merged = merge_shards(root / "m", [a.path, _shard(setup, images, 1, 2, "ordered1").path])
    res = merged.query(images, k=1, method="retrac")
    np.testing.assert_array_equal(res.ids[:, 0], np.arange(len(images)))
    np.testing.assert_array_equal(merged.ids, whole.ids)


def test_shards_of_other_data_with_the_same_row_count_are_refused(setup):
    _, _, images, _ = setup
    other = images.copy()
    other[7] = 1 - other[7]  # one image changed, in the other shard's rows
    a = _shard(setup, images, 0, 3, "d0")
    b = _shard(setup, other, 2, 3, "d2")
    c = _shard(setup, images, 1, 3, "d1")
    with pytest.raises(gi.IndexStateError, match="other data"):
        merge_shards(setup[0] / "m3", [a.path, c.path, b.path])


def test_shards_without_a_data_digest_merge_with_a_warning(setup, caplog):
    """Shards built before the digest was recorded still merge; what cannot be checked is said."""
    root, _, images, whole = setup
    parts = [_shard(setup, images, i, 2, f"old{i}").path for i in range(2)]
    for p in parts:
        manifest = read_manifest(p)
        del manifest["shard"]["data_digest"]
        write_json_atomic(p / MANIFEST, manifest)
    with caplog.at_level(logging.WARNING, logger="gradindex.build.shards"):
        merged = merge_shards(root / "m_old", parts)
    assert "cannot check" in caplog.text
    np.testing.assert_array_equal(merged.ids, whole.ids)
