"""Sharded builds: shards tile the rows, merge of shards equals one build, bad merges refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from diffusers import DDPMPipeline

import gradindex as gi
from gradindex.build.shards import merge_shards
from gradindex.cli.main import main
from gradindex.featurize.fidelity import format_fidelity
from gradindex.inputs.slices import parse_shard, shard_rows
from gradindex.store.vectors import VectorStore
from tests.conftest import scheduler, tiny_unet

SPEC = gi.BuildSpec(proj_dim=64, projection="sjlt", timesteps=3, noise_draws=2, batch_size=2)


def whole_build(root, image_seed: int):
    """Two checkpoint folders under root, 9 training images, and the whole build over them
    (the reference that shards, merges and appends must reproduce)."""
    ckpts = []
    for seed in (1, 2):
        DDPMPipeline(unet=tiny_unet(seed), scheduler=scheduler()).save_pretrained(root / f"c{seed}")
        ckpts.append(root / f"c{seed}")
    images = np.random.default_rng(image_seed).random((9, 1, 8, 8), dtype=np.float32)
    whole = gi.build_index(
        checkpoints=ckpts, data=images, out=root / "whole", spec=SPEC, progress=False
    )
    return root, ckpts, images, whole


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return whole_build(tmp_path_factory.mktemp("shards"), image_seed=3)


def _shard(setup, i, n, name=None, spec=SPEC, **kw):
    root, ckpts, images, _ = setup
    out = root / (name or f"s{i}of{n}")
    return gi.build_index(
        checkpoints=ckpts, data=images, out=out, spec=spec, shard=(i, n), progress=False, **kw
    )


def assert_same_index(a, b):
    """Same ids and norms, allclose rows, and the same top-k for both methods."""
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_allclose(a.norms, b.norms, rtol=1e-5, atol=1e-7)
    queries = np.random.default_rng(7).standard_normal((6, a.dim)).astype(np.float32)
    for method in ("tracin", "retrac"):
        np.testing.assert_allclose(a.vectors(method), b.vectors(method), rtol=1e-5, atol=1e-6)
        ra, rb = a.search(queries, k=5, method=method), b.search(queries, k=5, method=method)
        np.testing.assert_array_equal(ra.ids, rb.ids)
        np.testing.assert_allclose(ra.scores, rb.scores, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("n_rows", [1, 7, 9, 100])
def test_shards_tile_the_rows_once_in_order(n_rows):
    for n in range(1, min(n_rows, 8) + 1):
        ranges = [shard_rows((i, n), n_rows) for i in range(n)]
        rows = np.concatenate([np.arange(a, b) for a, b in ranges])
        np.testing.assert_array_equal(rows, np.arange(n_rows))
        assert all(b > a for a, b in ranges)  # none empty
        assert max(b - a for a, b in ranges) - min(b - a for a, b in ranges) <= 1


def test_parse_and_check_shard():
    assert parse_shard("2/5") == (2, 5)
    for bad in ("5/5", "-1/3", "1", "a/b", "1/0"):
        with pytest.raises(gi.SpecError, match="shard"):
            parse_shard(bad)
    with pytest.raises(gi.SpecError, match="at most 3 shards"):
        shard_rows((0, 4), 3)


def test_shard_holds_its_slice_of_the_whole_build(setup):
    _, _, _, whole = setup
    s1 = _shard(setup, 1, 2)
    record = dict(s1.manifest["shard"])
    assert len(record.pop("data_digest")) == 16  # of the whole data set: merge compares them
    assert record == {
        "index": 1,
        "count": 2,
        "start": 4,
        "stop": 9,
        "total_rows": 9,
        "merge_index": "flat",
        "merge_target_recall": 0.95,
    }
    np.testing.assert_array_equal(s1.ids, whole.ids[4:])
    np.testing.assert_allclose(
        s1.vectors("tracin"), whole.vectors("tracin")[4:], rtol=1e-5, atol=1e-6
    )
    assert s1.manifest["spec_fingerprint"] == whole.manifest["spec_fingerprint"]


def test_merge_of_shards_equals_the_whole_build(setup):
    root, _, _, whole = setup
    shards = [_shard(setup, i, 3, name=f"m{i}") for i in range(3)]
    merged = merge_shards(root / "merged", [s.path for s in reversed(shards)])  # any order
    assert_same_index(merged, whole)
    m = merged.manifest
    assert m["num_rows"] == 9 and "shard" not in m
    assert m["spec_fingerprint"] == whole.manifest["spec_fingerprint"]
    assert [p["start"] for p in m["merged_from"]] == [0, 3, 6]
    assert not (root / ".merged.staging").exists()
    merged.verify()  # checksums in the manifest match the files
    # the fidelity sample came from the first shard's rows 0..2: the merged index says so
    fid, fid0 = m["fidelity"], shards[0].manifest["fidelity"]
    assert fid["measured_on"] == "rows 0-2 (the first shard's)"
    assert {k: v for k, v in fid.items() if k != "measured_on"} == fid0
    assert "of rows 0-2 (the first shard's)" in format_fidelity(fid)
    # a training image embedded at query time still finds itself first
    res = merged.query(setup[2][:3], k=1, method="retrac")
    np.testing.assert_array_equal(res.ids[:, 0], whole.ids[:3])


def test_bad_merges_are_refused(setup):
    root, _, _, whole = setup
    a = _shard(setup, 0, 3, name="b0").path
    b = _shard(setup, 1, 3, name="b1").path
    c = _shard(setup, 2, 3, name="b2").path
    with pytest.raises(gi.IndexStateError, match="rows 6..8 of 9 are in no shard"):
        merge_shards(root / "x", [a, b])
    with pytest.raises(gi.IndexStateError, match="rows 0..2 of 9 are in no shard"):
        merge_shards(root / "x", [b, c])
    with pytest.raises(gi.IndexStateError, match="overlap"):
        merge_shards(root / "x", [a, b, b, c])
    half = _shard(setup, 1, 2, name="h1").path  # rows 4..8 overlap shard 1/3's rows 3..5
    with pytest.raises(gi.IndexStateError, match="overlap"):
        merge_shards(root / "x", [a, b, half])
    other = _shard(setup, 2, 3, name="o2", spec=SPEC.replace(seed=5)).path
    with pytest.raises(gi.IndexStateError, match=r"spec differs .*spec\.seed"):
        merge_shards(root / "x", [a, b, other])
    with pytest.raises(gi.IndexStateError, match="not a shard"):
        merge_shards(root / "x", [whole.path])
    with pytest.raises(gi.IndexStateError, match="incomplete index|no such index"):
        merge_shards(root / "x", [a, b, root / "nothing"])
    with pytest.raises(gi.IndexStateError, match="also one of the shards"):
        merge_shards(a, [a, b, c], overwrite=True)
    assert not (root / "x").exists()  # no refused merge leaves an index behind
    merge_shards(root / "x", [a, b, c])
    with pytest.raises(gi.IndexStateError, match="--overwrite"):
        merge_shards(root / "x", [a, b, c])
    again = merge_shards(root / "x", [a, b, c], overwrite=True)
    assert len(again) == 9


def test_merge_refuses_other_checkpoints(setup, tmp_path):
    root, ckpts, images, _ = setup
    a = _shard(setup, 0, 2, name="k0").path
    DDPMPipeline(unet=tiny_unet(9), scheduler=scheduler()).save_pretrained(tmp_path / "c9")
    b = gi.build_index(
        checkpoints=[ckpts[0], tmp_path / "c9"],
        data=images,
        out=tmp_path / "k1",
        spec=SPEC,
        shard=(1, 2),
        progress=False,
    ).path
    with pytest.raises(gi.IndexStateError, match="checkpoint fingerprints differ"):
        merge_shards(tmp_path / "x", [a, b])


def test_shard_build_is_resumable(setup, monkeypatch):
    root, ckpts, images, whole = setup
    out = root / "resumed"
    original = VectorStore.write_rows
    calls = {"n": 0}

    def dies_on_second(self, start, *args):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(self, start, *args)

    monkeypatch.setattr(VectorStore, "write_rows", dies_on_second)
    with pytest.raises(KeyboardInterrupt):
        gi.build_index(
            checkpoints=ckpts, data=images, out=out, spec=SPEC, shard=(1, 2), progress=False
        )
    monkeypatch.setattr(VectorStore, "write_rows", original)
    with pytest.raises(gi.IndexStateError, match=r"different settings \(num_rows, shard\)"):
        gi.build_index(
            checkpoints=ckpts,
            data=images,
            out=out,
            spec=SPEC,
            shard=(0, 2),
            resume=True,
            progress=False,
        )
    done = gi.build_index(
        checkpoints=ckpts,
        data=images,
        out=out,
        spec=SPEC,
        shard=(1, 2),
        resume=True,
        progress=False,
    )
    np.testing.assert_array_equal(done.ids, whole.ids[4:])
    np.testing.assert_allclose(
        done.vectors("retrac"), whole.vectors("retrac")[4:], rtol=1e-5, atol=1e-6
    )


def test_cli_shard_build_and_merge(setup, tmp_path):
    _, ckpts, images, whole = setup
    data = tmp_path / "train.npy"
    np.save(data, images)
    args = ["--proj-dim", "64", "--timesteps", "3", "--noise-draws", "2", "--batch-size", "2"]
    ck = [a for c in ckpts for a in ("-c", str(c))]
    runner = CliRunner()
    for i in range(2):
        out = str(tmp_path / f"s{i}")
        res = runner.invoke(
            main, ["build", *ck, "--data", str(data), "--out", out, "--shard", f"{i}/2", *args]
        )
        assert res.exit_code == 0, res.output
    res = runner.invoke(
        main, ["merge", str(tmp_path / "m"), str(tmp_path / "s0"), str(tmp_path / "s1"), "--json"]
    )
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["num_rows"] == 9
    assert_same_index(gi.AttributionIndex.open(tmp_path / "m"), whole)
    res = runner.invoke(main, ["merge", str(tmp_path / "m2"), str(tmp_path / "s0")])
    assert res.exit_code == 1
    assert res.output.strip().splitlines()[-1] == (
        "Error: rows 4..8 of 9 are in no shard given; pass every shard"
    )
    res = runner.invoke(main, ["build", *ck, "--data", str(data), "--out", "z", "--shard", "2/2"])
    assert res.exit_code == 1 and "Error: shard 2/2: need n >= 1 and 0 <= i < n" in res.output


def test_merge_of_class_conditional_shards_keeps_labels(tmp_path, images):
    from tests.inputs.test_conditional import class_unet

    pairs = [(class_unet(1), scheduler())]
    labels = np.array([2, 0, 1, 2, 1, 0, 1])
    kw = dict(checkpoints=pairs, data=images, labels=labels, spec=SPEC, progress=False)
    whole = gi.build_index(out=tmp_path / "whole", **kw)
    parts = [gi.build_index(out=tmp_path / f"s{i}", shard=(i, 2), **kw).path for i in range(2)]
    merged = merge_shards(tmp_path / "m", parts)
    assert_same_index(merged, whole)
    with VectorStore.open(merged.path / "vectors.h5") as store:
        np.testing.assert_array_equal(store.column("labels"), labels)
