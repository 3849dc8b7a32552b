"""Issue 25's "Must show", end to end through the documented CLI commands: the runs diffusers'
own example trainers leave (reproduced step for step by ``tests/trainer_refs.py``), indexed as
docs/usage.md and docs/conditional.md say, against references computed here from what the
training loops themselves held.

- ``train_unconditional.py --use_ema --prediction_type sample``: ``--weights ema`` names one
  kind of weights for every checkpoint; ``--checkpoint-weights auto`` equals the sums of the
  learning rates the loop logged; rows are the gradients of the script's snr(t)-weighted loss at
  the EMA weights (a per-sample autograd loop), and with ``--precondition adam`` those gradients
  times the Adam scales of the live optimizer state.
- ``train_text_to_image_lora.py --snr_gamma 5``: the min-SNR loss taken from the logged
  arguments; rows and auto weights as above, the weights from the logged schedule.

The Hub's parquet layout building the same rows as the image folder is
``tests/inputs/test_sources.py::test_a_hub_layout_parquet_folder_builds_the_rows_of_the_image_folder``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from gradindex.cli.main import main
from tests.conftest import scheduler, tiny_unet
from tests.diffusion_refs import rel_err
from tests.featurize.test_trained_loss import reference
from tests.trainer_refs import adam_scale, train_lora, train_unconditional, with_weights

GRID = (250, 750)  # --timesteps 2: the evenly spaced grid over 1000 training timesteps
# checkpoint-3, checkpoint-6, and training goes on to step 8 (OUTPUT); the scripts log the rate
# after each step, 0 after the last under their default cosine schedule (docs/methods.md)
STEPS, EVERY = 8, 3
BOUNDS = (0, 3, 6, 8)
CKPTS = (3, 6, STEPS)


def lr_sums(lrs: dict[int, float], bounds=BOUNDS) -> list[float]:
    """TracIn's w_c: the logged learning rates summed over the steps since the last save."""
    return [sum(lrs[s] for s in range(a + 1, b + 1)) for a, b in zip(bounds, bounds[1:])]


def build(args: list[str]) -> dict:
    """``gradindex build ARGS`` with identity projection; the manifest it wrote."""
    out = args[args.index("--out") + 1]
    args = [*args, "--timesteps", "2", "--projection", "identity", "--fidelity-sample", "0"]
    res = CliRunner().invoke(main, ["build", *args])
    assert res.exit_code == 0, res.output
    manifest = json.loads((Path(out) / "manifest.json").read_text())
    manifest["_output"] = res.output
    return manifest


def rows(index_dir) -> dict[str, np.ndarray]:
    from gradindex import AttributionIndex

    idx = AttributionIndex.open(index_dir)
    return {"tracin": idx.vectors("tracin"), "retrac": idx.vectors("retrac"), "norms": idx.norms}


def assert_rows_match(got: dict, blocks: list, weights: list[float], keep=None) -> None:
    """Stored rows vs per-checkpoint references (tracin, retrac, norms) weighted by √w_c:
    ≤ 1e-4 relative per row, over the columns ``keep`` ([p] mask, each block) when given."""
    tracin = np.concatenate([np.sqrt(w) * b[0] for b, w in zip(blocks, weights)], axis=1)
    retrac = np.concatenate([np.sqrt(w) * b[1] for b, w in zip(blocks, weights)], axis=1)
    cols = np.tile(keep, len(blocks)) if keep is not None else slice(None)
    assert rel_err(got["tracin"][:, cols], tracin[:, cols]).max() <= 1e-4
    assert rel_err(got["retrac"][:, cols], retrac[:, cols]).max() <= 1e-4
    np.testing.assert_allclose(got["norms"], np.stack([b[2] for b in blocks], 1), rtol=1e-4)


def key_bias_columns(model: torch.nn.Module) -> np.ndarray:
    """[p] mask of the attention key biases' columns. Their gradient is identically 0 (a shift
    of every key moves a query's logits by one constant: softmax ignores it), so training left
    Adam's v ≈ 0 there and scale ≈ 1/eps = 1e8 multiplies pure rounding noise, float32 in the
    index and float64 in the reference: those columns are compared as noise, not as values."""
    return np.concatenate(
        [np.full(p.numel(), n.endswith("to_k.bias")) for n, p in model.named_parameters()]
    )


# -- train_unconditional.py --use_ema --prediction_type sample --------------------------------


@pytest.fixture(scope="module")
def ema_sample_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("uncond") / "ddpm-ema-out"
    run = train_unconditional(
        out, use_ema=True, prediction_type="sample", steps=STEPS, checkpointing_steps=EVERY,
        lr_warmup_steps=2, log_with="tensorboard",
    )  # fmt: skip
    data = tmp_path_factory.mktemp("data") / "train.npy"
    np.save(data, np.random.default_rng(3).random((3, 1, 8, 8), dtype=np.float32))
    return out, run, data


def test_the_unconditional_run_is_laid_out_as_the_script_leaves_it(ema_sample_run):
    out, run, _ = ema_sample_run
    assert sorted(p.name for p in (out / "checkpoint-6").iterdir()) == [
        "optimizer.bin", "random_states_0.pkl", "scheduler.bin", "unet", "unet_ema",
    ]  # fmt: skip
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]
    sched = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert sched["prediction_type"] == "sample"
    assert list((out / "logs" / "train_unconditional").glob("events.out.tfevents.*"))
    assert sorted(run["lrs"]) == list(range(1, STEPS + 1))


def ema_blocks(out, run, data, steps, adam=False) -> list:
    """Per checkpoint, the reference rows of train_unconditional.py's sample-prediction loss
    at the EMA weights the loop held (and Adam's scales from its optimizer state), computed in
    float64."""
    x0s = torch.from_numpy(np.load(data)).double() * 2 - 1
    blocks = []
    for step in steps:
        held = run["saved"][step] if step in run["saved"] else run["final"]
        model = with_weights(tiny_unet(0), held["ema"]).double()
        scale = adam_scale(model, held["optimizer"]) if adam else None
        blocks.append(
            reference(
                model,
                scheduler("sample"),
                x0s,
                {"script": "unconditional"},
                timesteps=GRID,
                M=1,
                scale=scale,
            )  # fmt: skip
        )
    return blocks


def test_ema_run_index_uses_ema_weights_the_scripts_loss_and_logged_lr(ema_sample_run, tmp_path):
    """The docs' command, --weights ema --checkpoint-weights auto: every checkpoint EMA, named
    in the summary and in info; w_c = the logged lr sums; rows = autograd of the script's loss
    (taken from the run: its project is train_unconditional and its scheduler predicts x0)."""
    out, run, data = ema_sample_run
    ckpts = ["-c", str(out / "checkpoint-3"), "-c", str(out / "checkpoint-6"), "-c", str(out)]
    manifest = build([*ckpts, "--data", str(data), "--out", str(tmp_path / "idx"),
                      "--weights", "ema", "--checkpoint-weights", "auto"])  # fmt: skip
    assert manifest["weights"] == "ema"
    assert [c["weights"] for c in manifest["checkpoints"]] == ["ema", "ema", "ema"]
    assert manifest["spec"]["snr_weighting"] == "snr"
    assert "--snr-weighting" not in manifest["_output"]  # taken from the run: no warning
    want = lr_sums(run["lrs"])
    got = [c["weight"] for c in manifest["checkpoints"]]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert manifest["run_records"]["checkpoint_weights"]["method"].startswith("exact")
    info = CliRunner().invoke(main, ["info", str(tmp_path / "idx")])
    assert info.exit_code == 0, info.output
    for summary in (manifest["_output"], info.output):  # build's and info's
        lines = [line for line in summary.splitlines() if line.startswith("weights ")]
        assert len(lines) == 1 and lines[0].split()[1] == "ema", summary
        assert lines[0].endswith("for every checkpoint of the run")
    assert_rows_match(rows(tmp_path / "idx"), ema_blocks(out, run, data, CKPTS), want)


def test_adam_preconditioning_on_the_ema_checkpoints(ema_sample_run, tmp_path):
    """--precondition adam with --weights ema: the scales come from each checkpoint's
    optimizer.bin, and rows = autograd gradients x the live optimizer's 1/(sqrt(v̂)+eps).
    The output folder keeps no optimizer state: refused in one line."""
    out, run, data = ema_sample_run
    ckpts = ["-c", str(out / "checkpoint-3"), "-c", str(out / "checkpoint-6")]
    opts = ["--weights", "ema", "--checkpoint-weights", "auto", "--precondition", "adam"]
    manifest = build([*ckpts, "--data", str(data), "--out", str(tmp_path / "adam"), *opts])
    assert [c["weights"] for c in manifest["checkpoints"]] == ["ema", "ema"]
    want = lr_sums(run["lrs"], BOUNDS[:3])
    np.testing.assert_allclose([c["weight"] for c in manifest["checkpoints"]], want, rtol=1e-6)
    blocks = ema_blocks(out, run, data, CKPTS[:2], adam=True)
    noise = key_bias_columns(tiny_unet(0))
    got = rows(tmp_path / "adam")
    assert_rows_match(got, blocks, want, keep=~noise)
    for kind in ("tracin", "retrac"):  # the noise columns hardly move a row's scores
        row = got[kind].reshape(len(got[kind]), len(want), -1)
        share = np.linalg.norm(row[:, :, noise], axis=-1) / np.linalg.norm(row, axis=-1)
        assert share.max() <= 1e-3
    bad = CliRunner().invoke(
        main,
        [
            "build",
            *ckpts,
            "-c",
            str(out),
            "--data",
            str(data),
            "--out",
            str(tmp_path / "bad"),
            *opts,
        ],  # fmt: skip
    )
    assert bad.exit_code == 1 and len(bad.output.splitlines()) == 1, bad.output
    assert bad.output.startswith("Error: ") and "optimizer.bin" in bad.output


# -- train_text_to_image_lora.py --snr_gamma 5 ------------------------------------------------

LORA_ARGS = {  # vars(args) of the LoRA script as init_trackers receives it (a subset)
    "snr_gamma": 5.0,
    "noise_offset": 0.0,
    "prediction_type": None,
    "learning_rate": 1e-3,
    "lr_scheduler": "cosine",
    "lr_warmup_steps": 2,
    "max_train_steps": STEPS,
    "checkpointing_steps": EVERY,
    "rank": 2,
    "resolution": 16,
}


def test_lora_run_index_uses_the_min_snr_loss_and_scheduled_lr(
    tmp_path, sd_run, caption_folder, pixels
):
    """The docs' LoRA command with --checkpoint-weights auto on the LoRA script's run: the loss
    (min-SNR, gamma 5) from its logged arguments, w_c = the sums of the rates its schedule gave
    the training loop (no lr logged), rows = autograd of the script's per-sample loss."""
    pytest.importorskip("peft")
    from tests.diffusion_refs import CAPTIONS, reference_inputs
    from tests.inputs.test_lora import lora_unet

    out = tmp_path / "lora-out"
    run = train_lora(out, LORA_ARGS, checkpointing_steps=EVERY)
    ckpts = ["-c", str(out / "checkpoint-3"), "-c", str(out / "checkpoint-6"), "-c", str(out)]
    manifest = build(["--base-model", str(sd_run), *ckpts, "--data", str(caption_folder),
                      "--out", str(tmp_path / "idx"), "--checkpoint-weights", "auto"])  # fmt: skip
    spec = manifest["spec"]
    assert (spec["snr_weighting"], spec["snr_gamma"]) == ("min_snr", 5.0)
    assert {"snr_weighting", "snr_gamma"} <= set(manifest["run_records"]["taken"])
    want = lr_sums(run["lrs"])
    np.testing.assert_allclose([c["weight"] for c in manifest["checkpoints"]], want, rtol=1e-6)
    method = manifest["run_records"]["checkpoint_weights"]["method"]
    assert method.startswith("the schedule in the arguments logged under"), method
    assert "equal to the rate saved in 2 checkpoint(s)" in method
    latents, conds = reference_inputs(sd_run, pixels, CAPTIONS)
    blocks = []
    for step in CKPTS:
        adapter = (run["saved"][step] if step in run["saved"] else run["final"])["raw"]
        model = with_weights(lora_unet(0), adapter)
        blocks.append(
            reference(
                model,
                scheduler(),
                latents,
                {"script": "t2i", "snr_gamma": 5.0},
                conds=conds,
                names=set(adapter),
                timesteps=GRID,
                M=1,
            )  # fmt: skip
        )
    assert_rows_match(rows(tmp_path / "idx"), blocks, want)
