"""Messages that send a user the right way, one line each: checkpoint folders without weights
or with pickled .bin weights (never diffusers' own fetch text), an --output of another format,
checkpoints moved after the build (--checkpoint points the index at them), a deleted manifest
(the advice given works)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from gradindex.cli.main import main
from tests.conftest import scheduler, tiny_unet

REPO = Path(__file__).resolve().parents[2]
SPEC = ["--proj-dim", "32", "--timesteps", "2", "--fidelity-sample", "0"]


def cli(*args) -> tuple[int, list[str]]:
    res = CliRunner().invoke(main, [str(a) for a in args])
    return res.exit_code, res.output.splitlines()


def run(*args, cwd: Path) -> subprocess.CompletedProcess:
    """The CLI in its own process: diffusers' logging writes to the real stderr."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "gradindex.cli", *map(str, args)],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


@pytest.fixture
def run_dir(tmp_path):
    """A pipeline folder (unet/ + scheduler/) and 4 training images."""
    from diffusers import DDPMPipeline

    DDPMPipeline(unet=tiny_unet(1), scheduler=scheduler()).save_pretrained(tmp_path / "full")
    np.save(tmp_path / "x.npy", np.random.default_rng(0).random((4, 1, 8, 8), np.float32))
    return tmp_path


def _without_weights(run_dir: Path, name: str) -> Path:
    folder = shutil.copytree(run_dir / "full", run_dir / name)
    for f in (folder / "unet").glob("*.safetensors"):
        f.unlink()
    return folder


def test_checkpoint_without_weights_is_one_line_of_ours(run_dir):
    _without_weights(run_dir, "noweights")
    res = run("build", "-c", "noweights", "-d", "x.npy", "-o", "out", *SPEC, cwd=run_dir)
    assert res.returncode == 1
    assert (res.stdout + res.stderr).splitlines() == [
        "Error: noweights/unet: no weights (diffusion_pytorch_model.safetensors or .bin) beside "
        "its config.json; point at a folder the model was saved to with save_pretrained"
    ]


def test_pickled_bin_checkpoint_loads_with_one_warning(run_dir):
    folder = _without_weights(run_dir, "bin")
    torch.save(tiny_unet(1).state_dict(), folder / "unet" / "diffusion_pytorch_model.bin")
    res = run("build", "-c", "bin", "-d", "x.npy", "-o", "out", *SPEC, "--json", cwd=run_dir)
    assert res.returncode == 0, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip() and "featurizing" not in ln]
    assert lines == [
        "Warning: bin/unet: weights from a pickled .bin file, read as plain tensors only; save "
        "the model with save_pretrained to get .safetensors"
    ]


@pytest.mark.parametrize(
    ("where", "text", "why"),
    [
        ("unet/config.json", "{bad", "not a valid JSON config (Expecting property name"),
        ("unet/config.json", "[1, 2]", "a config must be a JSON object, not list"),
        ("scheduler/scheduler_config.json", "\xff\xfe", "not a valid JSON config ("),
    ],
)
def test_a_damaged_config_is_one_line_naming_the_file(run_dir, where, text, why):
    folder = shutil.copytree(run_dir / "full", run_dir / "damaged")
    (folder / where).write_bytes(text.encode("latin-1"))
    res = run("build", "-c", "damaged", "-d", "x.npy", "-o", "out", *SPEC, cwd=run_dir)
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr[-2000:]
    lines = (res.stdout + res.stderr).splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: damaged/{where}: {why}"), lines


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (
            "drop",
            "Error: other/unet: the weights file lacks 1 of the model's tensors (conv_in.bias)",
        ),
        ("reshape", "Error: other/unet: could not load the model ("),
    ],
)
def test_weights_of_another_architecture_are_refused_naming_the_tensor(run_dir, edit, expected):
    """A tensor missing from the weights file (diffusers would initialise it afresh and only log
    it) or of another shape (torch's error announces a list on its first line and gives the
    reason on the next) is one line naming the tensor."""
    from safetensors.torch import save_file

    folder = _without_weights(run_dir, "other")
    weights = dict(tiny_unet(1).state_dict())
    if edit == "drop":
        del weights["conv_in.bias"]
    else:
        weights["conv_in.bias"] = torch.zeros(weights["conv_in.bias"].numel() + 1)
    save_file(weights, folder / "unet" / "diffusion_pytorch_model.safetensors")
    res = run("build", "-c", "other", "-d", "x.npy", "-o", "out", *SPEC, cwd=run_dir)
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr[-2000:]
    (line,) = [ln for ln in (res.stdout + res.stderr).splitlines() if ln.startswith("Error")]
    assert line.startswith(expected) and "conv_in" in line, line


class Payload:
    def __reduce__(self):
        return (os.system, ("touch PAYLOAD_RAN",))


def test_pickled_bin_with_code_is_refused_in_one_line_without_running_it(run_dir):
    folder = _without_weights(run_dir, "evil")
    torch.save({"conv_in.weight": Payload()}, folder / "unet" / "diffusion_pytorch_model.bin")
    res = run("build", "-c", "evil", "-d", "x.npy", "-o", "out", *SPEC, cwd=run_dir)
    assert res.returncode == 1
    lines = [ln for ln in (res.stdout + res.stderr).splitlines() if not ln.startswith("Warning")]
    assert len(lines) == 1 and lines[0].startswith("Error: evil/unet: could not load the model (")
    assert "Traceback" not in res.stderr and "An error occurred" not in res.stderr
    assert not (run_dir / "PAYLOAD_RAN").exists()


def test_output_of_another_format_is_one_line_naming_the_formats(tmp_path):
    code, lines = cli("query", tmp_path, tmp_path / "q.npy", "--output", "x.csv")
    assert code == 1
    assert lines == [
        "Error: --output x.csv: give a .jsonl (one JSON record per query and method) or .npz "
        "(arrays) file; no other format is written"
    ]


# -- checkpoints moved after the build -----------------------------------------------------------


@pytest.fixture
def moved(saved_checkpoints, tmp_path):
    """An index over two checkpoint folders, its answer for 2 images, then the run moved."""
    images = np.random.default_rng(3).random((5, 1, 8, 8), np.float32)
    np.save(tmp_path / "x.npy", images)
    np.save(tmp_path / "q.npy", images[:2])
    args = [a for c in saved_checkpoints for a in ("-c", c)]
    code, lines = cli("build", *args, "-d", tmp_path / "x.npy", "-o", tmp_path / "idx", *SPEC)
    assert code == 0, lines
    code, before = cli("query", tmp_path / "idx", tmp_path / "q.npy", "-k", "3")
    assert code == 0, before
    shutil.move(tmp_path / "run", tmp_path / "moved")
    new = [tmp_path / "moved" / c.name for c in saved_checkpoints]
    return tmp_path, saved_checkpoints, new, before


def test_moved_checkpoints_name_the_option_that_points_at_them(moved):
    root, old, _, _ = moved
    code, lines = cli("query", root / "idx", root / "q.npy")
    assert code == 1
    assert lines == [
        f"Error: checkpoint 0 of the index, {old[0].resolve()}, is gone; if it moved, give the "
        "checkpoint folders' new places in build order (query / serve --checkpoint DIR, once "
        "each; AttributionIndex.open(path, checkpoints=[...]))"
    ]


def test_query_with_checkpoint_answers_as_before_the_move(moved):
    root, _, new, before = moved
    code, lines = cli("query", root / "idx", root / "q.npy", "-k", "3", "-c", new[0], "-c", new[1])
    assert code == 0, lines
    assert lines == before


def test_checkpoints_in_another_order_are_refused(moved):
    root, _, new, _ = moved
    code, lines = cli("query", root / "idx", root / "q.npy", "-c", new[1], "-c", new[0])
    assert code == 1
    assert len(lines) == 1 and lines[0].startswith(f"Error: checkpoint 0 ({new[1].resolve()})")
    assert lines[0].endswith("not this index's checkpoint; give its folders in build order")


def test_serve_with_checkpoint_answers_queries(moved, monkeypatch):
    pytest.importorskip("starlette")
    import uvicorn
    from starlette.testclient import TestClient

    from tests.serve_helpers import png_of, query_pixels

    root, _, new, _ = moved
    apps = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: apps.append(app))
    code, lines = cli("serve", root / "idx", "-c", new[0], "-c", new[1])
    assert code == 0, lines
    r = TestClient(apps[0], base_url="http://localhost").post(
        "/query", files={"image": ("q.png", png_of(query_pixels(0)))},
        data={"k": "3", "method": ["tracin"]},
    )  # fmt: skip
    assert r.status_code == 200, r.text[-300:]


@pytest.mark.parametrize("given", ["missing", "one"])
def test_serve_with_wrong_checkpoints_fails_at_start_not_at_a_first_query(
    moved, monkeypatch, given
):
    """A --checkpoint that does not exist, or too few of them, stops `serve` before it listens
    (it started and only the first query failed)."""
    import uvicorn

    root, _, new, _ = moved
    started = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: started.append(app))
    args = ["-c", root / "nowhere", "-c", new[1]] if given == "missing" else ["-c", new[0]]
    code, lines = cli("serve", root / "idx", *args)
    assert not started and code == 1
    expected = (
        f"Error: checkpoint 0, {root / 'nowhere'}: no such checkpoint folder"
        if given == "missing"
        else "Error: the index has 2 checkpoints but 1 were given"
    )
    assert lines == [expected]


# -- a deleted manifest ----------------------------------------------------------------------------


def test_deleted_manifest_advice_is_consistent_and_works(run_dir):
    build = ["build", "-c", run_dir / "full", "-d", run_dir / "x.npy", "-o", run_dir / "idx"]
    code, lines = cli(*build, *SPEC)
    assert code == 0, lines
    (run_dir / "idx" / "manifest.json").unlink()
    said = (
        f"Error: {run_dir / 'idx'}: holds an index's files but no manifest.json (deleted?); "
        "restore it from a backup, or rebuild in its place: the same 'gradindex build' with "
        "--overwrite"
    )
    assert cli("info", run_dir / "idx") == (1, [said])
    assert cli(*build, *SPEC, "--resume") == (1, [said])
    code, lines = cli(*build, *SPEC, "--overwrite")  # the advice works
    assert code == 0, lines
    code, lines = cli("info", run_dir / "idx")
    assert code == 0 and lines[0].startswith("index")


# -- an error raised without a message -------------------------------------------------------


@pytest.mark.parametrize("kind", ["ModelError", "DataError", "IndexStateError", "SearchError"])
def test_an_error_without_a_message_is_described_never_named(tmp_path, monkeypatch, kind):
    """The one-line handler shows what the error means (its class's description), not the bare
    class name and not a traceback (an empty message made it fail on ``splitlines()[0]``)."""
    import gradindex.errors as errors

    error = getattr(errors, kind)

    def raises(**kw):
        raise error()

    monkeypatch.setattr("gradindex.build.pipeline.build_index", raises)
    np.save(tmp_path / "x.npy", np.zeros((2, 1, 8, 8), np.float32))
    code, lines = cli("build", "-c", tmp_path, "-d", tmp_path / "x.npy", "-o", tmp_path / "o")
    described = error.__doc__.strip().splitlines()[0].rstrip(".:")
    assert code == 1 and lines == [f"Error: {described}"]
    assert kind not in lines[0]
