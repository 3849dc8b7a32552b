"""Distributed builds: a 2-process torchrun build (gloo, CPU) equals a 1-process build."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from diffusers import DDPMPipeline

import gradindex as gi
from gradindex.build.distributed import distributed_build, world_from_env
from tests.conftest import scheduler, tiny_unet

ROOT = Path(__file__).resolve().parents[2]
SPEC_ARGS = ["--proj-dim", "64", "--timesteps", "3", "--noise-draws", "2", "--batch-size", "2"]
SPEC = gi.BuildSpec(proj_dim=64, timesteps=3, noise_draws=2, batch_size=2)


@pytest.fixture
def run_setup(tmp_path):
    ckpts = []
    for seed in (1, 2):
        DDPMPipeline(unet=tiny_unet(seed), scheduler=scheduler()).save_pretrained(
            tmp_path / f"c{seed}"
        )
        ckpts.append(tmp_path / f"c{seed}")
    images = np.random.default_rng(4).random((9, 1, 8, 8), dtype=np.float32)
    np.save(tmp_path / "train.npy", images)
    return tmp_path, ckpts, images


def test_world_from_env(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert world_from_env() is None
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    assert world_from_env() is None  # one process: an ordinary build
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    assert world_from_env() == (3, 4)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(gi.SpecError, match="RANK < WORLD_SIZE"):
        world_from_env()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(gi.SpecError, match="as integers"):
        world_from_env()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_single_rank_group_builds_merges_and_resumes(run_setup, monkeypatch):
    """In-process with a 1-rank gloo group: shard, merge, cleanup, resume reuse and refusal."""
    tmp, ckpts, images = run_setup
    for key, value in dict(
        RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port())
    ).items():
        monkeypatch.setenv(key, value)
    kw = dict(checkpoints=ckpts, data=images, spec=SPEC, progress=False)
    idx = distributed_build(out=tmp / "d", keep_shards=True, **kw)
    whole = gi.build_index(out=tmp / "whole", **kw)
    np.testing.assert_allclose(idx.vectors("tracin"), whole.vectors("tracin"), rtol=1e-5, atol=1e-6)
    shard = tmp / "d.shards" / "rank-00000-of-00001"
    assert (shard / "manifest.json").exists()
    with pytest.raises(gi.IndexStateError, match="already holds a finished index"):
        distributed_build(out=tmp / "d", **kw)  # refused before any featurizing
    with pytest.raises(gi.IndexStateError, match=r"different settings \(spec\.seed\)"):
        distributed_build(
            out=tmp / "d", resume=True, overwrite=True, **{**kw, "spec": SPEC.replace(seed=3)}
        )
    again = distributed_build(out=tmp / "d", resume=True, overwrite=True, **kw)  # shard reused
    assert again.manifest["build_seconds"] == idx.manifest["build_seconds"]
    assert not (tmp / "d.shards").exists()  # removed after a successful merge


def test_single_rank_group_passes_labels_and_checks_them_on_resume(tmp_path, monkeypatch):
    """Class labels reach every rank's shard: the merged rows equal a one-process labelled
    build's, and a resume with other labels is refused by name instead of reusing the shard."""
    for key, value in dict(
        RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port())
    ).items():
        monkeypatch.setenv(key, value)
    images = np.random.default_rng(5).random((6, 1, 8, 8), dtype=np.float32)
    labels = np.array([2, 0, 1, 2, 1, 0])
    model = tiny_unet(7, num_class_embeds=3)
    kw = dict(checkpoints=[(model, scheduler())], data=images, spec=SPEC, progress=False)
    idx = distributed_build(out=tmp_path / "d", labels=labels, keep_shards=True, **kw)
    whole = gi.build_index(out=tmp_path / "whole", labels=labels, **kw)
    other_labels = gi.build_index(out=tmp_path / "other", labels=labels[::-1].copy(), **kw)
    for method in ("tracin", "retrac"):
        np.testing.assert_allclose(idx.vectors(method), whole.vectors(method), rtol=1e-5, atol=1e-6)
        assert not np.allclose(idx.vectors(method), other_labels.vectors(method), atol=1e-4)
    assert idx.conditioning["kind"] == "class"
    with pytest.raises(gi.IndexStateError, match=r"different settings \(conditioning\)"):
        distributed_build(
            out=tmp_path / "d", labels=labels[::-1].copy(), resume=True, overwrite=True, **kw
        )


@pytest.mark.slow
def test_torchrun_two_process_build_equals_one_process_build(run_setup):
    tmp, ckpts, images = run_setup
    ck = [a for c in ckpts for a in ("-c", str(c))]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [
        *(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"),
        *("-m", "gradindex.cli", "build", *ck, "--data", str(tmp / "train.npy")),
        *("--out", str(tmp / "dist"), "--json", *SPEC_ARGS),
    ]
    res = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert '"num_rows": 9' in res.stdout  # rank 0 printed the merged index
    dist_idx = gi.AttributionIndex.open(tmp / "dist")
    whole = gi.build_index(
        checkpoints=ckpts, data=images, out=tmp / "whole", spec=SPEC, progress=False
    )
    np.testing.assert_array_equal(dist_idx.ids, whole.ids)
    for method in ("tracin", "retrac"):
        np.testing.assert_allclose(
            dist_idx.vectors(method), whole.vectors(method), rtol=1e-5, atol=1e-6
        )
    np.testing.assert_allclose(dist_idx.norms, whole.norms, rtol=1e-5, atol=1e-7)
    for sfx in ("", "_retrac"):  # the Grams its factors give: one build's, to rounding
        mine, one = (_gram(p / "kernel.h5", sfx) for p in (tmp / "dist", whole.path))
        np.testing.assert_allclose(mine, one, atol=1e-5 * np.abs(one).max())
    assert [p["start"] for p in dist_idx.manifest["merged_from"]] == [0, 4]
    assert not (tmp / "dist.shards").exists()


def _gram(path, sfx):
    """U diag(Λ) Uᵀ from kernel.h5's factors (exact below the rank cap): G_c, or the N x N
    K_c of a dual basis (N < d)."""
    with h5py.File(path, "r") as f:
        name = f"dual_basis{sfx}" if f"dual_basis{sfx}" in f else f"basis{sfx}"
        u, ev = f[name][()].astype(np.float64), f[f"eigenvalues{sfx}"][()]
    return np.einsum("cdr,cr,cer->cde", u, ev, u)
