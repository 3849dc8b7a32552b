"""Builds that survive being killed, indexes that refuse to lie, concurrent readers."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

import gradindex as gi
from gradindex.cli.main import main
from gradindex.store.vectors import VectorStore
from tests.conftest import assert_rows_close, scheduler, tiny_unet

ROOT = Path(__file__).resolve().parents[2]

CHILD = """
import sys, numpy as np, torch
torch.set_num_threads(1)
import gradindex as gi
ckpts, data, out, resume = sys.argv[1].split(","), sys.argv[2], sys.argv[3], sys.argv[4] == "1"
from gradindex.store.vectors import VectorStore
write = VectorStore.write_rows
def reporting(self, start, *a):
    write(self, start, *a)
    print("wrote", start, flush=True)  # lets the parent kill at a chosen point of progress
VectorStore.write_rows = reporting
spec = gi.BuildSpec(proj_dim=64, timesteps=2, noise_draws=2, batch_size=2)
print("started", flush=True)
gi.build_index(checkpoints=ckpts, data=data, out=out, spec=spec, resume=resume, progress=False)
print("finished", flush=True)
"""


def _child(tmp_path, ckpts, data, out, resume):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    args = [
        sys.executable,
        str(script),
        ",".join(map(str, ckpts)),
        str(data),
        str(out),
        "1" if resume else "0",
    ]
    return subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT
    )


@pytest.mark.slow
def test_sigkill_then_resume_gives_identical_vectors(tmp_path, saved_checkpoints):
    data = tmp_path / "train.npy"
    np.save(data, np.random.default_rng(3).random((40, 1, 8, 8), dtype=np.float32))
    ref = tmp_path / "ref"
    p = _child(tmp_path, saved_checkpoints, data, ref, False)
    assert p.wait(timeout=600) == 0, p.stderr.read()

    out = tmp_path / "killed"
    rng = np.random.default_rng(0)
    done_at_kill = []
    for i, batches in enumerate((2, 5, 4)):  # kill after this many more committed batches
        p = _child(tmp_path, saved_checkpoints, data, out, i > 0)
        assert p.stdout.readline().strip() == "started"
        for _ in range(batches):
            assert p.stdout.readline().startswith("wrote")
        time.sleep(rng.uniform(0, 0.3))  # somewhere inside the next batch or its write
        p.send_signal(signal.SIGKILL)
        p.wait()
        assert not (out / "manifest.json").exists()
        with pytest.raises(gi.IndexStateError, match="incomplete index"):
            gi.AttributionIndex.open(out)
        with VectorStore.open(out / "vectors.h5") as store:  # still a readable file
            done_at_kill.append(int(store.done.sum()))
    assert done_at_kill == sorted(done_at_kill) and done_at_kill[0] > 0 and done_at_kill[-1] < 40, (
        done_at_kill
    )
    p = _child(tmp_path, saved_checkpoints, data, out, True)
    assert p.wait(timeout=600) == 0, p.stderr.read()
    a, b = gi.AttributionIndex.open(ref), gi.AttributionIndex.open(out)
    for m in ("tracin", "retrac"):
        np.testing.assert_array_equal(a.vectors(m), b.vectors(m))
    np.testing.assert_array_equal(a.norms, b.norms)


@pytest.fixture
def small_index(tmp_path, images):
    spec = gi.BuildSpec(proj_dim=32, timesteps=2, batch_size=3)
    model, sched = tiny_unet(4), scheduler()
    idx = gi.build_index(
        checkpoints=[(model, sched)], data=images, out=tmp_path / "idx", spec=spec, progress=False
    )
    return idx, (model, sched), spec


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 8] = bytes(b ^ 0xFF for b in data[mid : mid + 8])
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(max(0, path.stat().st_size // 2))


@pytest.mark.parametrize("damage", [_flip, _truncate], ids=["flip", "truncate"])
def test_damaged_files_are_named(tmp_path, small_index, damage):
    idx, _, _ = small_index
    names = list(idx.manifest["files"])
    assert {"vectors.h5", "tracin.faiss", "retrac.faiss"} <= set(names)
    for name in names:
        copy = tmp_path / f"copy-{name}"
        shutil.copytree(idx.path, copy)
        damage(copy / name)
        res = CliRunner().invoke(main, ["info", str(copy), "--verify"])
        assert res.exit_code == 1, (name, res.output)
        assert f"{copy / name}:" in res.output and res.output.startswith("Error:")
        fix = f"gradindex kernel {copy}" if name == "kernel.h5" else "or rebuild the index"
        assert res.output.rstrip().endswith(fix), res.output  # what to do (session 14 probe)
        if damage is _truncate and name == "kernel.h5":  # only the kernel methods read it
            opened = gi.AttributionIndex.open(copy)
            with pytest.raises(gi.IndexStateError, match=f"{copy / name}.*gradindex kernel"):
                opened.search(np.ones(opened.dim, np.float32), 2, "trak")
        elif damage is _truncate:
            with pytest.raises(gi.IndexStateError, match=str(copy / name)):
                gi.AttributionIndex.open(copy)
    res = CliRunner().invoke(main, ["info", str(idx.path), "--verify"])
    assert res.exit_code == 0 and "match their checksums" in res.output


def test_non_finite_gradients_are_flagged_not_indexed(tmp_path, images, monkeypatch):
    from gradindex.featurize import gradients

    original = gradients.GradientFeaturizer.featurize

    def poisoned(self, x0, draws, cond=None, **kw):
        f = original(self, x0, draws, cond, **kw)
        bad = x0.flatten(1)[:, 0] > 0.9  # rows whose first pixel is bright
        f.tracin[bad] = float("nan")
        return f

    imgs = images.copy()
    imgs[:, 0, 0, 0] = 0.0
    imgs[[2, 5], 0, 0, 0] = 1.0  # -> model range 1.0 > 0.9
    monkeypatch.setattr(gradients.GradientFeaturizer, "featurize", poisoned)
    with pytest.warns(UserWarning, match="2 training sample"):
        idx = gi.build_index(
            checkpoints=[(tiny_unet(4), scheduler())],
            data=imgs,
            out=tmp_path / "f",
            spec=gi.BuildSpec(proj_dim=32, timesteps=2),
            progress=False,
        )
    assert idx.info()["num_flagged"] == 2
    np.testing.assert_array_equal(np.flatnonzero(idx.flagged), [2, 5])
    q = np.random.default_rng(0).standard_normal((20, idx.dim)).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = idx.search(q, k=7, method="retrac")
    assert res.rows.shape == (20, 5) and not np.isin(res.rows, [2, 5]).any()


def test_same_spec_same_bytes_and_batch_size_tolerance(tmp_path, images, small_index):
    idx, pair, spec = small_index
    again = gi.build_index(
        checkpoints=[pair], data=images, out=tmp_path / "again", spec=spec, progress=False
    )
    other = gi.build_index(
        checkpoints=[pair],
        data=images,
        out=tmp_path / "bs5",
        spec=spec.replace(batch_size=5),
        progress=False,
    )
    for m in ("tracin", "retrac"):
        np.testing.assert_array_equal(again.vectors(m), idx.vectors(m))
        # across batch sizes: equal up to float32 summation order (stated tolerance 1e-5)
        assert_rows_close(other.vectors(m), idx.vectors(m))


def test_disk_full_keeps_committed_rows_and_resumes(tmp_path, images, small_index, monkeypatch):
    idx, pair, spec = small_index
    original = VectorStore.write_rows
    calls = {"n": 0}

    def failing(self, start, *args):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, start, *args)

    monkeypatch.setattr(VectorStore, "write_rows", failing)
    out = tmp_path / "full"
    with pytest.raises(gi.IndexStateError, match="disk full.*--resume"):
        gi.build_index(checkpoints=[pair], data=images, out=out, spec=spec, progress=False)
    with h5py.File(out / "vectors.h5", "r") as f:
        assert f["done"][()].sum() == spec.batch_size  # the first batch survived
    monkeypatch.setattr(VectorStore, "write_rows", original)
    with pytest.raises(gi.IndexStateError, match="unfinished build"):
        gi.build_index(checkpoints=[pair], data=images, out=out, spec=spec, progress=False)
    done = gi.build_index(
        checkpoints=[pair], data=images, out=out, spec=spec, resume=True, progress=False
    )
    np.testing.assert_array_equal(done.vectors("tracin"), idx.vectors("tracin"))


def test_resume_with_other_settings_is_refused(tmp_path, images, small_index, monkeypatch):
    _, pair, spec = small_index
    out = tmp_path / "r"
    monkeypatch.setattr(
        VectorStore, "write_rows", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt)
    )
    with pytest.raises(KeyboardInterrupt):
        gi.build_index(checkpoints=[pair], data=images, out=out, spec=spec, progress=False)
    monkeypatch.undo()
    with pytest.raises(gi.IndexStateError, match="spec.seed"):
        gi.build_index(
            checkpoints=[pair],
            data=images,
            out=out,
            spec=spec.replace(seed=9),
            resume=True,
            progress=False,
        )


def test_unwritable_output_is_a_clear_error(tmp_path, images, small_index):
    _, pair, spec = small_index
    blocker = tmp_path / "file"
    blocker.write_text("x")
    res_dir = blocker / "idx"  # a folder under a regular file cannot be created
    with pytest.raises((gi.IndexStateError, OSError)):
        gi.build_index(checkpoints=[pair], data=images, out=res_dir, spec=spec, progress=False)


QUERY_CHILD = """
import json, sys, numpy as np, torch
torch.set_num_threads(1)
import gradindex as gi
idx = gi.AttributionIndex.open(sys.argv[1])
q = np.load(sys.argv[2])
out = {m: idx.query(q, k=4, method=m).rows.tolist() for m in ("tracin", "retrac")}
print(json.dumps(out))
"""


@pytest.mark.slow
def test_eight_concurrent_query_processes(tmp_path, images, saved_checkpoints):
    spec = gi.BuildSpec(proj_dim=32, timesteps=2)
    idx = gi.build_index(
        checkpoints=saved_checkpoints, data=images, out=tmp_path / "idx", spec=spec, progress=False
    )
    queries = tmp_path / "q.npy"
    np.save(queries, images[::-1].copy())
    single = {
        m: idx.query(images[::-1].copy(), k=4, method=m).rows.tolist() for m in ("tracin", "retrac")
    }
    script = tmp_path / "q.py"
    script.write_text(QUERY_CHILD)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(idx.path), str(queries)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(8)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (stdout, stderr) in zip(procs, outs):
        assert p.returncode == 0, stderr
        assert json.loads(stdout.strip().splitlines()[-1]) == single


def test_resume_of_a_finished_build_is_a_checked_noop(tmp_path, images, small_index):
    """A re-run job step with --resume on a finished index returns it untouched; with other
    settings it is refused, naming them; without --resume it is still refused."""
    idx, pair, spec = small_index
    out = tmp_path / "idx"
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = gi.build_index(
        checkpoints=[pair], data=images, out=out, spec=spec, resume=True, progress=False
    )
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    np.testing.assert_array_equal(again.vectors("tracin"), idx.vectors("tracin"))
    with pytest.raises(gi.IndexStateError, match=r"different settings \(spec.seed\)"):
        gi.build_index(
            checkpoints=[pair],
            data=images,
            out=out,
            spec=spec.replace(seed=3),
            resume=True,
            progress=False,
        )
    with pytest.raises(gi.IndexStateError, match=r"different settings \(num_rows\)"):
        gi.build_index(
            checkpoints=[pair], data=images[:5], out=out, spec=spec, resume=True, progress=False
        )
    with pytest.raises(gi.IndexStateError, match="already holds a finished index; pass"):
        gi.build_index(checkpoints=[pair], data=images, out=out, spec=spec, progress=False)


def test_resume_of_a_finished_conditional_build_checks_its_labels(tmp_path, images):
    """The no-op resume compares the conditioning data too (a digest kept in the manifest)."""
    from tests.inputs.test_conditional import class_unet

    labels = np.array([2, 0, 1, 2, 1, 0, 1])
    kw = dict(
        checkpoints=[(class_unet(1), scheduler())],
        data=images,
        out=tmp_path / "c",
        spec=gi.BuildSpec(proj_dim=16, timesteps=2, batch_size=4),
        progress=False,
    )
    first = gi.build_index(labels=labels, **kw)
    again = gi.build_index(labels=labels, resume=True, **kw)
    np.testing.assert_array_equal(again.vectors("tracin"), first.vectors("tracin"))
    with pytest.raises(gi.IndexStateError, match=r"different settings \(conditioning\)"):
        gi.build_index(labels=labels[::-1].copy(), resume=True, **kw)


def test_resume_featurizes_only_the_missing_rows(tmp_path, images, small_index, monkeypatch):
    """A build stopped after its first batch, then resumed: the resume asks the featurizer for
    exactly the rows not yet done (not every row), and the result equals an uninterrupted build."""
    from gradindex.featurize.gradients import GradientFeaturizer

    idx, pair, spec = small_index
    original = VectorStore.write_rows
    monkeypatch.setattr(
        VectorStore,
        "write_rows",
        lambda self, start, *a: (
            original(self, start, *a) if start == 0 else (_ for _ in ()).throw(KeyboardInterrupt)
        ),
    )
    out = tmp_path / "partial"
    with pytest.raises(KeyboardInterrupt):
        gi.build_index(checkpoints=[pair], data=images, out=out, spec=spec, progress=False)
    monkeypatch.setattr(VectorStore, "write_rows", original)
    with h5py.File(out / "vectors.h5", "r") as f:
        done = f["done"][()].astype(bool)
    assert done.sum() == spec.batch_size and done[: spec.batch_size].all()

    asked = []
    featurize = GradientFeaturizer.featurize

    def counting(self, x0, *a, **kw):
        asked.append(len(x0))
        return featurize(self, x0, *a, **kw)

    monkeypatch.setattr(GradientFeaturizer, "featurize", counting)
    resumed = gi.build_index(  # no fidelity sample: it would featurize sampled rows again
        checkpoints=[pair], data=images, out=out, spec=spec, resume=True, progress=False,
        fidelity_sample=0,
    )  # fmt: skip
    assert sum(asked) == len(images) - spec.batch_size  # one checkpoint: one call per batch
    for m in ("tracin", "retrac"):  # summation order may differ with the thread count
        np.testing.assert_allclose(resumed.vectors(m), idx.vectors(m), rtol=1e-5, atol=1e-6)
