"""Training runs as diffusers' example trainers leave them: EMA runs (``--use_ema``), the
final save after the last checkpoint, and where the run keeps its noise scheduler.

The run is written as ``train_unconditional.py`` writes it: accelerate's ``save_state`` with
the script's save hook (``EMAModel.save_pretrained`` into ``unet_ema/``, the model into
``unet/``, weights popped), the optimizer / lr-scheduler / RNG files accelerate adds, and the
final ``DDPMPipeline.save_pretrained(OUTPUT)`` with the EMA weights copied in.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import gradindex as gi
from gradindex.cli.main import main
from gradindex.inputs.models import load_checkpoints
from gradindex.inputs.optimizer_state import find_optimizer_file
from tests.conftest import scheduler
from tests.trainer_refs import train_unconditional

SPEC = gi.BuildSpec(proj_dim=16, timesteps=2, batch_size=4)
STEPS = 4
SAVE_AT = (2, 4)  # checkpointing_steps=2: training ends at a checkpoint


def train_run(out: Path, use_ema: bool = True) -> dict:
    """A tiny run of train_unconditional.py's loop (tests/trainer_refs.py); returns the
    weights and optimizer state it held at each checkpoint (the independent reference)."""
    return train_unconditional(out, use_ema=use_ema, steps=STEPS, checkpointing_steps=2)["saved"]


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ema-run")
    return out, train_run(out)


@pytest.fixture(scope="module")
def raw_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("raw-run")
    return out, train_run(out, use_ema=False)


def _same(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(p, weights[n]) for n, p in model.named_parameters())


def test_the_layout_is_the_scripts(ema_run):
    out, _ = ema_run
    have = sorted(p.name for p in (out / "checkpoint-2").iterdir())
    assert have == ["optimizer.bin", "random_states_0.pkl", "scheduler.bin", "unet", "unet_ema"]
    assert (out / "unet" / "config.json").exists() and (out / "scheduler").is_dir()


def test_an_ema_run_uses_one_kind_of_weights_for_every_checkpoint(ema_run, tmp_path):
    out, saved = ema_run
    ckpts = [out / "checkpoint-2", out / "checkpoint-4"]
    raw = load_checkpoints(ckpts)
    assert [c.weights for c in raw] == ["raw", "raw"]
    assert all(_same(c.model, saved[s]["raw"]) for c, s in zip(raw, SAVE_AT, strict=True))
    ema = load_checkpoints(ckpts, weights="ema")
    assert [c.weights for c in ema] == ["ema", "ema"]
    assert all(_same(c.model, saved[s]["ema"]) for c, s in zip(ema, SAVE_AT, strict=True))
    assert not _same(ema[1].model, saved[4]["raw"])  # the EMA differs from the raw weights
    # the documented -c checkpoint-2 -c checkpoint-4 -c OUTPUT: OUTPUT holds EMA weights only
    with pytest.raises(gi.ModelError, match=r"final save of an EMA run .* one kind for every"):
        load_checkpoints([*ckpts, out])
    with pytest.raises(gi.ModelError, match=r"unet_ema: holds EMA weights, but the other"):
        load_checkpoints([ckpts[0], out / "checkpoint-4" / "unet_ema"])
    # with ema, OUTPUT repeats the last checkpoint's EMA weights (training ended there)
    with pytest.raises(gi.ModelError, match=r"checkpoints 1 .* and 2 .* hold the same weights"):
        load_checkpoints([*ckpts, out], weights="ema")
    with pytest.raises(gi.ModelError, match=r"unet: the raw weights of an EMA checkpoint, but"):
        load_checkpoints([ckpts[0], out / "checkpoint-4" / "unet"], weights="ema")
    mixed = load_checkpoints([ckpts[0], out / "checkpoint-4" / "unet_ema"], weights="ema")
    assert _same(mixed[1].model, saved[4]["ema"])


def test_the_index_names_its_weights_and_queries_reload_them(ema_run, tmp_path):
    out, saved = ema_run
    runner = CliRunner()
    args = ["build", "-c", str(out / "checkpoint-2"), "-c", str(out / "checkpoint-4"),
            "-d", str(tmp_path / "x.npy"), "--proj-dim", "16", "--timesteps", "2",
            "--fidelity-sample", "0"]  # fmt: skip
    np.save(tmp_path / "x.npy", np.random.default_rng(0).random((5, 1, 8, 8), np.float32))
    res = runner.invoke(main, [*args, "-o", str(tmp_path / "ema"), "--weights", "ema"])
    assert res.exit_code == 0, res.output
    assert "weights      ema (the run's --use_ema averages" in res.output
    manifest = json.loads((tmp_path / "ema" / "manifest.json").read_text())
    assert manifest["weights"] == "ema"
    assert [c["weights"] for c in manifest["checkpoints"]] == ["ema", "ema"]
    info = runner.invoke(main, ["info", str(tmp_path / "ema")])
    assert "weights      ema (the run's --use_ema averages" in info.output
    # a query reloads the EMA weights: a training image finds its own stored row
    idx = gi.AttributionIndex.open(tmp_path / "ema")
    x = np.load(tmp_path / "x.npy")
    np.testing.assert_allclose(idx.embed(x[:2])["tracin"], idx.vectors("tracin")[:2], atol=1e-5)
    assert _same(idx.loaded_checkpoints[1].model, saved[4]["ema"])
    # the raw build of the same folders has other rows, and says raw
    res = runner.invoke(main, [*args, "-o", str(tmp_path / "raw")])
    assert res.exit_code == 0, res.output
    assert "weights      raw" in res.output
    raw = gi.AttributionIndex.open(tmp_path / "raw")
    assert not np.allclose(raw.vectors("tracin"), idx.vectors("tracin"))
    bad = runner.invoke(main, [*args, "-c", str(out), "-o", str(tmp_path / "mixed")])
    assert bad.exit_code != 0 and bad.output.startswith("Error: ")
    assert "final save of an EMA run" in bad.output and len(bad.output.splitlines()) == 1


def test_a_run_without_ema_refuses_ema_weights(raw_run):
    out, saved = raw_run
    ckpts = load_checkpoints([out / "checkpoint-2", out / "checkpoint-4"])
    assert _same(ckpts[1].model, saved[4]["raw"])
    with pytest.raises(gi.ModelError, match=r"raw weights only \(no unet_ema/"):
        load_checkpoints([out / "checkpoint-2"], weights="ema")


def test_the_output_folder_after_the_last_checkpoint_is_not_counted_twice(raw_run, tmp_path):
    """Training ended at checkpoint-4, so the output folder saved the same weights again: the
    documented -c checkpoint-2 -c checkpoint-4 -c OUTPUT is refused, naming both."""
    out, _ = raw_run
    x = np.random.default_rng(1).random((3, 1, 8, 8), np.float32)
    with pytest.raises(gi.ModelError, match=r"checkpoints 1 \(.*checkpoint-4\) and 2 \(.*\) hold "):
        gi.build_index(
            checkpoints=[out / "checkpoint-2", out / "checkpoint-4", out], data=x,
            out=tmp_path / "i", spec=SPEC, progress=False, fidelity_sample=0,
        )  # fmt: skip
    with pytest.raises(gi.SpecError, match="checkpoint_weights.*positive.*not weighted 0"):
        gi.BuildSpec(checkpoint_weights=[1e-3, 1e-3, 0])  # and a weight of 0 cannot hide one


def test_adam_preconditioning_finds_an_ema_checkpoints_optimizer_state(ema_run):
    """The scales come from checkpoint-N/optimizer.bin for unet_ema/ as for unet/; compared
    with the live optimizer's state: 1 / (sqrt(v / (1 - β2^step)) + eps)."""
    out, saved = ema_run
    found = find_optimizer_file(out / "checkpoint-4" / "unet_ema")
    assert found == out / "checkpoint-4" / "optimizer.bin"
    for given in (out / "checkpoint-4" / "unet_ema", out / "checkpoint-4"):
        (c,) = load_checkpoints([given], precondition="adam", weights="ema")
        state = saved[4]["optimizer"]
        group = state["param_groups"][0]
        beta2, eps = group["betas"][1], group["eps"]
        names = [n for n, _ in c.model.named_parameters()]
        for pos, name in enumerate(names):
            entry = state["state"][pos]
            v = entry["exp_avg_sq"].double() / (1 - beta2 ** float(entry["step"]))
            want = (1 / (v.sqrt() + eps)).float()
            torch.testing.assert_close(c.scales[name], want, rtol=1e-6, atol=0)


def test_checkpoint_unet_finds_the_runs_scheduler_in_the_output_folder(ema_run):
    out, _ = ema_run
    (c,) = load_checkpoints([out / "checkpoint-4" / "unet"])  # the README's form
    assert c.scheduler.config.prediction_type == "epsilon"
    torch.testing.assert_close(c.scheduler.alphas_cumprod, scheduler().alphas_cumprod)
    assert c.scheduler_source == str((out / "scheduler").resolve())


def test_an_explicit_scheduler_wins_over_the_runs_own(ema_run, tmp_path):
    out, _ = ema_run
    other = tmp_path / "sched"
    scheduler("v_prediction").save_pretrained(other)
    (c,) = load_checkpoints([out / "checkpoint-4"], scheduler=str(other))
    assert c.prediction_type == "v_prediction"  # the explicit one, not the run's epsilon
    # the index records it, and a query computes its rows with it again
    x = np.random.default_rng(1).random((3, 1, 8, 8), np.float32)
    idx = gi.build_index(
        checkpoints=[out / "checkpoint-4"], scheduler=str(other), data=x, out=tmp_path / "i",
        spec=SPEC, progress=False, fidelity_sample=0,
    )  # fmt: skip
    reopened = gi.AttributionIndex.open(tmp_path / "i")
    np.testing.assert_allclose(reopened.embed(x)["tracin"], idx.vectors("tracin"), atol=1e-5)
    assert reopened.loaded_checkpoints[0].prediction_type == "v_prediction"
