"""Build lifecycle: --overwrite never loses the old index, one writer per folder, every check
that can run before featurizing does, write failures and model quirks as one-line errors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

import gradindex as gi
from gradindex.build.append import add_samples
from gradindex.cli.main import main
from gradindex.featurize import gradients
from gradindex.store.vectors import VectorStore
from tests.conftest import assert_rows_close, scheduler, tiny_unet

ROOT = Path(__file__).resolve().parents[2]
SPEC = gi.BuildSpec(proj_dim=32, timesteps=2, batch_size=3)


@pytest.fixture
def pair():
    return tiny_unet(4), scheduler()


@pytest.fixture
def featurized(monkeypatch):
    """Counts the training / query rows featurized from here on."""
    rows = {"n": 0}
    original = gradients.GradientFeaturizer.featurize

    def counting(self, x0, *a, **k):
        rows["n"] += len(x0)
        return original(self, x0, *a, **k)

    monkeypatch.setattr(gradients.GradientFeaturizer, "featurize", counting)
    return rows


def _build(pair, images, out, spec=SPEC, **kw):
    kw.setdefault("fidelity_sample", 0)  # the counters here count the build's own rows only
    return gi.build_index(checkpoints=[pair], data=images, out=out, spec=spec, progress=False, **kw)


def _snapshot(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def _fail_on_batch(monkeypatch, batch: int, exc: BaseException):
    """Raise ``exc`` in place of the ``batch``-th row write (counted from 1); returns the
    original ``write_rows``."""
    original = VectorStore.write_rows
    calls = {"n": 0}

    def failing(self, *a):
        calls["n"] += 1
        if calls["n"] == batch:
            raise exc
        return original(self, *a)

    monkeypatch.setattr(VectorStore, "write_rows", failing)
    return original


# -- item 4: --overwrite builds beside the old index and swaps ---------------------------------


def test_interrupted_overwrite_keeps_the_old_index_and_resumes(
    tmp_path, images, pair, monkeypatch, featurized
):
    out = tmp_path / "idx"
    old = _build(pair, images, out)
    before = _snapshot(out)
    ref = _build(pair, images, tmp_path / "ref", SPEC.replace(seed=5))
    original = _fail_on_batch(monkeypatch, 2, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        _build(pair, images, out, SPEC.replace(seed=5), overwrite=True)
    monkeypatch.setattr(VectorStore, "write_rows", original)
    assert _snapshot(out) == before  # not a byte of the old index changed
    reopened = gi.AttributionIndex.open(out)
    reopened.verify()
    np.testing.assert_array_equal(reopened.vectors("tracin"), old.vectors("tracin"))
    # --overwrite --resume finishes the staged build: only the rows after the first batch
    featurized["n"] = 0
    new = _build(pair, images, out, SPEC.replace(seed=5), overwrite=True, resume=True)
    assert featurized["n"] == len(images) - SPEC.batch_size
    np.testing.assert_array_equal(new.vectors("tracin"), ref.vectors("tracin"))
    assert new.manifest["spec"]["seed"] == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx", "ref"]  # no staging, no lock


def test_overwrite_of_a_read_only_index_is_refused(tmp_path, images, pair):
    out = tmp_path / "idx"
    _build(pair, images, out)
    out.chmod(0o555)
    try:
        with pytest.raises(gi.IndexStateError, match="read-only.*chmod u\\+w"):
            _build(pair, images, out, overwrite=True)
    finally:
        out.chmod(0o755)
    gi.AttributionIndex.open(out).verify()


# -- item 9: one writer per folder; a failed add leaves no staging folder ----------------------


def test_a_second_build_into_a_folder_being_written_is_refused(tmp_path, images, pair, monkeypatch):
    out = tmp_path / "idx"
    inside, release = threading.Event(), threading.Event()
    original = VectorStore.write_rows

    def stalling(self, *a):
        inside.set()
        release.wait(60)
        return original(self, *a)

    monkeypatch.setattr(VectorStore, "write_rows", stalling)
    first: dict = {}
    worker = threading.Thread(target=lambda: first.update(idx=_build(pair, images, out)))
    worker.start()
    try:
        assert inside.wait(120)
        for kw in ({}, {"resume": True}, {"overwrite": True}):
            with pytest.raises(gi.IndexStateError, match=f"pid {os.getpid()}.* is writing"):
                _build(pair, images, out, **kw)
        # a reader is told the same, not advised to --resume a build that is running
        with pytest.raises(gi.IndexStateError, match=f"pid {os.getpid()}.* is building"):
            gi.AttributionIndex.open(out)
    finally:
        release.set()
        worker.join(120)
    assert first["idx"].manifest["num_rows"] == len(images)
    assert not (tmp_path / ".idx.lock").exists()


HOLDER = """
import sys, time
from pathlib import Path
from gradindex.store.lifecycle import folder_lock
with folder_lock(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(120)
"""


def test_the_lock_dies_with_its_process(tmp_path, images, pair):
    out = tmp_path / "idx"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(gi.IndexStateError, match=f"pid {proc.pid}"):
            _build(pair, images, out)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        proc.kill()
        proc.wait()
    assert (tmp_path / ".idx.lock").exists()  # left by the kill, but no longer held
    assert _build(pair, images, out).manifest["num_rows"] == len(images)
    assert not (tmp_path / ".idx.lock").exists()


def test_a_failed_add_leaves_no_staging_folder(tmp_path, images, pair, monkeypatch):
    from gradindex.build.append import add_samples
    from gradindex.store import lifecycle

    out = tmp_path / "idx"
    _build(pair, images[:4], out)
    before = _snapshot(out)
    out.chmod(0o555)  # read-only: refused before anything is written
    try:
        with pytest.raises(gi.IndexStateError, match="read-only"):
            add_samples(out, images[4:], checkpoints=[pair], progress=False)
    finally:
        out.chmod(0o755)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]

    def refused(a, b):  # what renameat2 reports where the folder cannot be replaced
        raise gi.GradIndexError(f"cannot move {a} into place at {b}: Permission denied")

    monkeypatch.setattr(lifecycle, "_exchange", refused)
    with pytest.raises(gi.GradIndexError, match="Permission denied"):
        add_samples(out, images[4:], checkpoints=[pair], progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]  # no .idx.staging / .adding
    assert _snapshot(out) == before


# -- item 7: what can be checked is checked before the first row is featurized ------------------


@pytest.mark.parametrize(
    ("kind", "recall", "needle"),
    [
        ("bogus", 0.95, "could not parse index string bogus"),
        ("IVF4,PQ5", 0.95, "multiple of the number of subquantizers"),
        ("hnsw", 1.5, "target recall must be in \\(0, 1\\]"),
    ],
)
def test_bad_index_kind_is_refused_before_featurizing(
    tmp_path, images, pair, featurized, kind, recall, needle
):
    with pytest.raises(gi.SearchError, match=needle):
        _build(pair, images, tmp_path / "idx", index=kind, target_recall=recall)
    assert featurized["n"] == 0
    assert not (tmp_path / "idx").exists()


def test_cli_bad_index_kind_is_one_line_before_featurizing(
    tmp_path, images, saved_checkpoints, featurized
):
    data = tmp_path / "x.npy"
    np.save(data, images)
    args = ["build", "-c", str(saved_checkpoints[0]), "-d", str(data), "-o", str(tmp_path / "o")]
    res = CliRunner().invoke(main, [*args, "--index", "bogus", "--proj-dim", "32"])
    assert res.exit_code == 1, res.output
    assert res.output.splitlines()[-1].startswith("Error: index kind 'bogus' is neither")
    assert "index_factory" not in res.output and "faiss" not in res.output.split("bogus")[-1]
    assert featurized["n"] == 0


def test_a_checkpoint_with_nan_weights_is_refused_before_featurizing(tmp_path, images, featurized):
    model = tiny_unet(4)
    with torch.no_grad():
        model.conv_out.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(gi.ModelError, match="conv_out.weight holds NaN"):
        _build((model, scheduler()), images, tmp_path / "idx")
    assert featurized["n"] == 0
    model = tiny_unet(4)
    with torch.no_grad():
        model.time_embedding.linear_1.bias[3] = float("inf")
    with pytest.raises(gi.ModelError, match="time_embedding.linear_1.bias holds NaN or inf"):
        _build((model, scheduler()), images, tmp_path / "idx")
    assert featurized["n"] == 0


def test_bad_k_is_refused_before_embedding(tmp_path, images, pair, featurized):
    idx = _build(pair, images, tmp_path / "idx")
    data = tmp_path / "q.npy"
    np.save(data, images[:2])
    featurized["n"] = 0
    for k in (-1, 0, 2.5, True):
        with pytest.raises(gi.SearchError, match="k=.*positive integer"):
            idx.query(images[:2], k=k)
    res = CliRunner().invoke(main, ["query", str(idx.path), str(data), "-k", "-1"])
    assert res.exit_code == 1 and res.output.splitlines()[-1] == (
        "Error: k=-1: must be a positive integer"
    )
    assert featurized["n"] == 0
    assert idx.query(images[:2], k=2).rows.shape == (2, 2)  # the counter counts


# -- item 8: FAISS write failures and model quirks as one-line errors --------------------------


def test_faiss_write_failure_is_one_line_with_resume_hint(
    tmp_path, images, pair, monkeypatch, featurized
):
    import faiss

    ref = _build(pair, images, tmp_path / "ref")
    real = faiss.write_index

    def full_disk(index, path, *a):
        # what faiss.write_index raises on a full disk, written to the same .tmp file first
        Path(path).write_bytes(b"\0" * 100)
        raise RuntimeError(
            "Error in void faiss::write_index(const Index*, IOWriter*, int) at "
            "/project/faiss/impl/index_write.cpp:499: Error: 'ret == (size * 4)' failed: write "
            f"error in {path}: 100 != 4096 (No space left on device)"
        )

    monkeypatch.setattr(faiss, "write_index", full_disk)
    out = tmp_path / "idx"
    with pytest.raises(gi.IndexStateError) as err:
        _build(pair, images, out)
    msg = str(err.value)
    assert "\n" not in msg and "faiss::" not in msg and "index_write.cpp" not in msg
    assert "disk full" in msg and "--resume" in msg
    assert not list(out.glob("*.tmp")) and not list(out.glob("*.faiss"))
    monkeypatch.setattr(faiss, "write_index", real)
    featurized["n"] = 0
    done = _build(pair, images, out, resume=True)
    assert featurized["n"] == 0  # every row was committed: the resume only builds the indexes
    np.testing.assert_array_equal(done.vectors("retrac"), ref.vectors("retrac"))
    np.testing.assert_array_equal(done.query(images[:3], k=4).rows, ref.query(images[:3], k=4).rows)


class _Flat(nn.Module):
    """A small batch-independent model over 1×4×4 images whose forward, by ``mode``, runs its
    Linear twice ("twice"), splits each item into two rows first ("fold"), or changes the
    Linear's input in place after using it ("inplace")."""

    def __init__(self, mode: str):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(16, 16)
        self.fold = nn.Linear(8, 8)
        self.mode = mode
        self.config = type("Config", (), {"sample_size": 4, "in_channels": 1})()

    def forward(self, x, t, **kw):
        h = x.flatten(1) + t[:, None].float() / 1000
        if self.mode == "twice":
            y = self.lin(torch.tanh(self.lin(h)))
        elif self.mode == "fold":
            y = self.lin(self.fold(h.reshape(-1, 8)).reshape(len(x), 16))
        else:
            y = self.lin(h)
            h.mul_(2)
            y = y + h
        return type("Out", (), {"sample": y.view_as(x)})()


def _flat_images() -> np.ndarray:
    return np.random.default_rng(1).random((3, 1, 4, 4), dtype=np.float32)


def _flat_spec(projection: str) -> gi.BuildSpec:
    return gi.BuildSpec(proj_dim=16, projection=projection, timesteps=2, batch_size=2)


def test_kronecker_on_a_module_run_twice_says_use_sjlt(tmp_path):
    with pytest.raises(gi.ModelError, match="lin.weight: .*more than once.*--projection sjlt"):
        _build(
            (_Flat("twice"), scheduler()), _flat_images(), tmp_path / "k", _flat_spec("kronecker")
        )
    _build((_Flat("twice"), scheduler()), _flat_images(), tmp_path / "s", _flat_spec("sjlt"))


def test_a_model_that_folds_the_batch(tmp_path, monkeypatch):
    """The hooks cannot split such a model per item, vmap can: backend 'auto' switches (same
    rows as vmap asked for), 'hooks' and the Kronecker projection say what to use instead."""
    import functools

    from gradindex.featurize import embedding

    ims, sched = _flat_images(), scheduler()
    auto = _build((_Flat("fold"), sched), ims, tmp_path / "auto", _flat_spec("sjlt"))
    with pytest.raises(gi.ModelError, match="leading dimension.*--projection sjlt"):
        _build((_Flat("fold"), sched), ims, tmp_path / "k", _flat_spec("kronecker"))
    for backend in ("vmap", "hooks"):
        partial = functools.partial(gradients.GradientFeaturizer, backend=backend)
        monkeypatch.setattr(embedding, "GradientFeaturizer", partial)
        if backend == "hooks":
            with pytest.raises(gi.ModelError, match="leading dimension.*backend='vmap'"):
                _build((_Flat("fold"), sched), ims, tmp_path / backend, _flat_spec("sjlt"))
        else:
            ref = _build((_Flat("fold"), sched), ims, tmp_path / backend, _flat_spec("sjlt"))
    np.testing.assert_allclose(auto.vectors("tracin"), ref.vectors("tracin"), rtol=1e-5)


@pytest.mark.parametrize("projection", ["sjlt", "kronecker"])
def test_a_layer_input_changed_in_place_is_a_model_error(tmp_path, projection):
    with pytest.raises(gi.ModelError, match="in place after the Linear used it.*out of place"):
        _build(
            (_Flat("inplace"), scheduler()), _flat_images(), tmp_path / "i", _flat_spec(projection)
        )


# -- batch size is not part of the spec's identity ---------------------------------------------


def test_resume_with_another_batch_size_is_the_same_index(
    tmp_path, images, pair, monkeypatch, featurized
):
    ref = _build(pair, images, tmp_path / "ref")
    out = tmp_path / "idx"
    original = _fail_on_batch(monkeypatch, 2, MemoryError())  # out of memory in batch 2
    with pytest.raises(MemoryError):
        _build(pair, images, out)
    monkeypatch.setattr(VectorStore, "write_rows", original)
    featurized["n"] = 0
    done = _build(pair, images, out, SPEC.replace(batch_size=2), resume=True)
    assert featurized["n"] == len(images) - SPEC.batch_size
    for m in ("tracin", "retrac"):  # equal up to float32 summation order across batch sizes
        assert_rows_close(done.vectors(m), ref.vectors(m))
    assert done.manifest["spec_fingerprint"] == ref.manifest["spec_fingerprint"]
    assert done.manifest["spec"]["batch_size"] == 2
    # a finished build re-run with another batch size is the same finished build: a no-op
    featurized["n"] = 0
    _build(pair, images, out, SPEC.replace(batch_size=5), resume=True)
    assert featurized["n"] == 0


# -- review: an index reached through a link or '.' --------------------------------------------


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_overwrite_and_add_through_a_link_write_the_real_folder(tmp_path, pair, images):
    """The link stays a link to the real folder, which holds the new index; nothing is left."""
    real = tmp_path / "real"
    _build(pair, images[:4], real)
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    idx = _build(pair, images[:5], link, overwrite=True)
    assert link.is_symlink() and link.resolve() == real.resolve()
    assert len(gi.AttributionIndex.open(real)) == 5 and len(idx) == 5
    add_samples(link, images[5:], checkpoints=[pair], progress=False)
    assert link.is_symlink() and len(gi.AttributionIndex.open(real)) == len(images)
    assert _leftovers(tmp_path) == []


def test_overwrite_from_inside_the_index_folder(tmp_path, pair, images, monkeypatch):
    """`-o .` from inside the index: swapped in beside it, no staging folder left inside."""
    real = tmp_path / "real"
    _build(pair, images[:4], real)
    monkeypatch.chdir(real)
    _build(pair, images[:6], Path("."), overwrite=True)
    assert len(gi.AttributionIndex.open(real)) == 6
    assert _leftovers(real) == [] and _leftovers(tmp_path) == []


def test_add_keeps_the_index_fidelity_record(tmp_path, pair, images, featurized):
    """add featurizes only the new rows (no fidelity sample of them) and keeps the record."""
    _build(pair, images[:4], tmp_path / "i", fidelity_sample=3)
    before = gi.AttributionIndex.open(tmp_path / "i").manifest["fidelity"]
    featurized["n"] = 0
    after = add_samples(tmp_path / "i", images[4:], checkpoints=[pair], progress=False)
    after = after.manifest["fidelity"]
    assert featurized["n"] == len(images) - 4
    assert after == before and after["sample"] == 3


def test_ctrl_c_is_one_line_with_what_to_do(tmp_path, monkeypatch, saved_checkpoints, images):
    np.save(tmp_path / "d.npy", images)

    def interrupted(**kw):
        raise KeyboardInterrupt

    monkeypatch.setattr("gradindex.build.pipeline.build_index", interrupted)
    args = ["build", "-c", str(saved_checkpoints[0]), "-d", str(tmp_path / "d.npy")]
    res = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "o"), "--proj-dim", "8"])
    assert res.exit_code == 1
    assert res.output.strip().splitlines() == [
        "Error: interrupted; the rows written so far are kept: run the same command with "
        "--resume to finish"
    ]
