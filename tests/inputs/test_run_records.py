"""A training run's own records (gradindex.inputs.run_records; issue 25 items 2 and 5).

The runs here are made the way diffusers' example trainers make them: accelerate's Accelerator
with the TensorBoard tracker (``init_trackers(project, config)``, ``accelerator.log``),
``save_state`` into ``checkpoint-<step>/`` with the scripts' save hook (``unet/``), an AdamW
optimizer under diffusers' cosine-with-warm-up schedule, the final pipeline in the output
folder. The learning rates a test expects are the ones the training loop itself saw.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from gradindex import AttributionIndex
from gradindex.cli.main import main
from gradindex.errors import ModelError, SpecError
from gradindex.inputs.run_records import (
    RunRecord,
    auto_weights,
    read_run,
    resolve_from_run,
    spec_from_run,
)
from gradindex.spec import BuildSpec
from tests.conftest import assert_rows_close
from tests.trainer_refs import train_unconditional

STEPS, EVERY = 12, 4
T2I_CONFIG = {  # the text-to-image scripts' vars(args), as init_trackers receives it
    "snr_gamma": 5.0,
    "noise_offset": 0.05,
    "prediction_type": None,  # TensorBoard leaves None values out
    "max_train_steps": STEPS,
    "learning_rate": 1e-3,
    "lr_scheduler": "cosine",
    "lr_warmup_steps": 3,
    "use_ema": False,
}


def train_run(out, project, config=None, log_lr=True, prediction_type="epsilon", skip=()):
    """Train a tiny UNet for STEPS steps like the scripts (tests/trainer_refs.py), trackers
    started as ``init_trackers(project, config)``, ``lr`` logged unless ``log_lr`` is False or
    the step is in ``skip``; returns {step: lr after it}."""
    return train_unconditional(
        out, use_ema=False, prediction_type=prediction_type, steps=STEPS,
        checkpointing_steps=EVERY, lr_warmup_steps=3, log_with="tensorboard", project=project,
        config=config, skip_lr=skip if log_lr else range(1, STEPS + 1),
    )["lrs"]  # fmt: skip


@pytest.fixture(scope="module")
def unconditional_run(tmp_path_factory):
    """train_unconditional.py --prediction_type sample: logs lr every step, no config."""
    out = tmp_path_factory.mktemp("uncond") / "ddpm-out"
    return out, train_run(out, "train_unconditional", prediction_type="sample")


@pytest.fixture(scope="module")
def t2i_run(tmp_path_factory):
    """A text-to-image script's run: its arguments logged, no learning rate logged."""
    out = tmp_path_factory.mktemp("t2i") / "sd-out"
    return out, train_run(out, "text2image-fine-tune", config=T2I_CONFIG, log_lr=False)


def sources(out):
    return [str(out / f"checkpoint-{s}") for s in range(EVERY, STEPS, EVERY)] + [str(out)]


def test_auto_weights_are_the_logged_learning_rate_sums(unconditional_run, tmp_path):
    """The documented command on a train_unconditional.py run: w_c = Σ logged lr over the
    steps since the previous checkpoint; shown in the summary, recorded in the manifest; the
    run's project fills snr_weighting='snr' for its sample prediction."""
    out, lrs = unconditional_run
    np.save(tmp_path / "x.npy", np.random.default_rng(0).random((3, 1, 8, 8), dtype=np.float32))
    args = ["build", "--data", str(tmp_path / "x.npy"), "--out", str(tmp_path / "idx")]
    for s in sources(out):
        args += ["-c", s]
    args += ["--checkpoint-weights", "auto", "--timesteps", "2", "--projection", "identity"]
    result = CliRunner().invoke(main, [*args, "--fidelity-sample", "0"])
    assert result.exit_code == 0, result.output
    bounds = [0, 4, 8, 12]
    want = [sum(lrs[g] for g in range(a + 1, b + 1)) for a, b in zip(bounds, bounds[1:])]
    manifest = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    got = [c["weight"] for c in manifest["checkpoints"]]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert manifest["spec"]["checkpoint_weights"] == got
    record = manifest["run_records"]
    assert record["checkpoint_weights"]["method"].startswith("exact")
    assert record["checkpoint_weights"]["steps"] == [4, 8, 12]
    assert manifest["spec"]["snr_weighting"] == "snr" and "train_unconditional" in str(record)
    assert "tracin w     auto, exact" in result.output
    assert "from run     snr_weighting='snr'" in result.output
    assert "loss weight  snr(t)" in result.output
    assert "--snr-weighting snr" not in result.output  # filled, so no warning
    # the rows: gradients of train_unconditional.py's own sample-prediction loss, by autograd
    from diffusers import DDPMScheduler, UNet2DModel

    from tests.featurize.test_trained_loss import reference

    sched = DDPMScheduler.from_pretrained(out / "scheduler")
    x0s = torch.from_numpy(np.load(tmp_path / "x.npy")) * 2 - 1
    tracin, retrac = [], []
    for s, w in zip(sources(out), want):
        model = UNet2DModel.from_pretrained(os.path.join(s, "unet")).eval()
        a, r, _ = reference(
            model, sched, x0s, {"script": "unconditional"}, timesteps=(250, 750), M=1
        )
        tracin.append(np.sqrt(w) * a)
        retrac.append(np.sqrt(w) * r)
    idx = AttributionIndex.open(tmp_path / "idx")
    assert_rows_close(idx.vectors("tracin"), np.concatenate(tracin, axis=1))
    assert_rows_close(idx.vectors("retrac"), np.concatenate(retrac, axis=1))


def test_without_logged_lr_the_logged_schedule_gives_the_sums(t2i_run):
    """No 'lr' logged, but the arguments name the schedule (--lr_scheduler cosine, warm-up,
    max_train_steps, --learning_rate): its rates, checked against each checkpoint's saved
    rate, give the same sums as the rates the training loop saw."""
    out, lrs = t2i_run
    weights, record = auto_weights(sources(out), read_run(out))
    bounds = [0, 4, 8, 12]
    want = [sum(lrs[g] for g in range(a + 1, b + 1)) for a, b in zip(bounds, bounds[1:])]
    np.testing.assert_allclose(weights, want, rtol=1e-6)
    assert "the schedule in the arguments logged under" in record["method"]
    assert "equal to the rate saved in 2 checkpoint(s)" in record["method"]


def test_without_logged_lr_or_schedule_weights_are_an_approximation(t2i_run):
    """Neither: each checkpoint's scheduler.bin rate x steps (trapezoid), the final folder at
    the logged max_train_steps with the last checkpoint's rate; called so. A logged schedule
    that contradicts the saved rates is not used."""
    out, lrs = t2i_run
    record = read_run(out)
    want = [4 * lrs[4], 4 * (lrs[4] + lrs[8]) / 2, 4 * lrs[8]]
    wrong = RunRecord(out, record.files, {**record.hparams, "lr_warmup_steps": 5.0})
    weights, how = auto_weights(sources(out), wrong)
    np.testing.assert_allclose(weights, want, rtol=1e-6)
    assert how["method"].startswith("approximation (the logged schedule gives")
    del record.hparams["lr_scheduler"]
    weights, how = auto_weights(sources(out), record)
    np.testing.assert_allclose(weights, want, rtol=1e-6)
    assert how["method"].startswith("approximation (no learning rate logged)")
    assert how["steps"] == [4, 8, 12]


def test_a_gap_in_the_logged_lr_is_not_called_exact(tmp_path):
    out = tmp_path / "gap"
    lrs = train_run(out, "train_unconditional", skip={6})
    weights, record = auto_weights(sources(out), read_run(out))
    assert record["method"].startswith("approximation (logged lr has missing steps)")
    np.testing.assert_allclose(weights[0], 4 * lrs[4], rtol=1e-6)


def test_the_run_config_fills_the_loss_the_user_left(t2i_run):
    out, _ = t2i_run
    record = read_run(out)
    assert record.hparams["snr_gamma"] == 5.0 and "prediction_type" not in record.hparams
    spec, taken = spec_from_run(BuildSpec(), record, "epsilon")
    assert (spec.snr_weighting, spec.snr_gamma, spec.noise_offset) == ("min_snr", 5.0, 0.05)
    assert set(taken) == {"snr_weighting", "snr_gamma", "noise_offset"}
    assert str(out) in taken["snr_gamma"]
    mine = BuildSpec(snr_weighting="min_snr", snr_gamma=3.0)
    with pytest.warns(UserWarning, match=r"snr_gamma=3.0 but the run recorded 5.0"):
        spec, taken = spec_from_run(mine, record, "epsilon")
    assert spec.snr_gamma == 3.0 and spec.noise_offset == 0.05 and "snr_gamma" not in taken


def test_a_recorded_prediction_type_that_differs_is_named(tmp_path):
    record = RunRecord(tmp_path, [], hparams={"prediction_type": "v_prediction"})
    with pytest.warns(UserWarning, match="trained with prediction_type 'v_prediction'"):
        spec_from_run(BuildSpec(), record, "epsilon")


class _Ckpt:
    def __init__(self, source, prediction_type="epsilon"):
        self.source, self.prediction_type = source, prediction_type


def test_without_tensorboard_a_one_line_error_saying_what_to_install(t2i_run, monkeypatch):
    out, _ = t2i_run
    for name in [m for m in sys.modules if m == "tensorboard" or m.startswith("tensorboard.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    ckpts = [_Ckpt(s) for s in sources(out)]
    with pytest.raises(ModelError, match="needs tensorboard: pip install tensorboard$"):
        resolve_from_run(BuildSpec(checkpoint_weights="auto"), ckpts)
    with pytest.warns(UserWarning, match="pip install tensorboard to take its loss settings"):
        spec, record = resolve_from_run(BuildSpec(), ckpts)
    assert spec == BuildSpec() and record is None


def test_auto_weights_refuse_what_they_cannot_tell(unconditional_run, tmp_path):
    out, _ = unconditional_run
    record = read_run(out)
    with pytest.raises(SpecError, match=r"steps \[8, 4\] are not increasing"):
        auto_weights(sources(out)[1::-1], record)
    with pytest.raises(SpecError, match="cannot tell at which step"):
        auto_weights([str(tmp_path)], None)
    with pytest.raises(SpecError, match="not models in memory"):
        resolve_from_run(BuildSpec(checkpoint_weights="auto"), [_Ckpt("memory:0")])


def test_checkpoint_weights_option(tmp_path):
    result = CliRunner().invoke(
        main,
        ["build", "-c", str(tmp_path), "-d", "x.npy", "-o", "o", "--checkpoint-weights", "1,x"],
    )
    assert result.exit_code == 1
    assert result.output.splitlines()[-1] == (
        "Error: --checkpoint-weights '1,x': give comma-separated numbers or 'auto'"
    )


def test_snr_gamma_flag_alone_and_no_run_records(unconditional_run, tmp_path):
    """--snr-gamma alone means the scripts' min-SNR weighting; --no-run-records takes nothing
    from the run (whose project would otherwise set 'snr')."""
    out, _ = unconditional_run
    np.save(tmp_path / "x.npy", np.random.default_rng(0).random((2, 1, 8, 8), dtype=np.float32))
    args = ["build", "-c", str(out), "-d", str(tmp_path / "x.npy"), "-o", str(tmp_path / "idx")]
    args += ["--snr-gamma", "5", "--noise-offset", "0.1", "--no-run-records", "--timesteps", "2"]
    result = CliRunner().invoke(main, [*args, "--proj-dim", "64", "--fidelity-sample", "0"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    spec = manifest["spec"]
    assert (spec["snr_weighting"], spec["snr_gamma"], spec["noise_offset"]) == ("min_snr", 5.0, 0.1)
    assert manifest["run_records"] is None and "from run" not in result.output
    assert "loss weight  min-SNR, gamma 5, noise offset 0.1" in result.output


def test_an_output_folder_one_step_past_the_last_checkpoint_at_the_schedules_end_is_named(
    tmp_path,
):
    """A cosine schedule logs lr 0 after its last step: an output folder saved one step after
    the last checkpoint sums to 0. The error names the steps and why, not duplicate weights."""
    out = tmp_path / "end"
    lrs = train_unconditional(
        out, use_ema=False, steps=5, checkpointing_steps=2, lr_warmup_steps=2,
        log_with="tensorboard",
    )["lrs"]  # fmt: skip
    assert lrs[5] == 0.0 and lrs[4] > 0
    srcs = [str(out / "checkpoint-2"), str(out / "checkpoint-4"), str(out)]
    with pytest.raises(SpecError, match=r"steps 5\.\.5 sum to 0 \(a schedule ending at 0"):
        auto_weights(srcs, read_run(out))
