"""The DDPM trainer: diffusers' layout, loadable with plain diffusers, deterministic under a
seed, reused when finished, refused when the folder holds another run, and its logs are right."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

from gradindex.demo import training
from gradindex.demo.sampling import sample_images
from gradindex.demo.training import (
    load_digits_images,
    small_unet_config,
    train_ddpm,
)
from gradindex.errors import DataError, ModelError

N, STEPS, BATCH, EVERY, LR = 64, 30, 16, 10, 3e-3
TOOL = Path(__file__).resolve().parents[2] / "tools" / "train_ddpm.py"


def tiny_config() -> dict:
    return small_unet_config(
        sample_size=8, channels=1, block_out_channels=(8, 16), norm_num_groups=4
    )


def probe() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    return torch.randn(3, 1, 8, 8, generator=g), torch.tensor([0, 417, 999])


def train(images, out, **kw):
    args = dict(
        steps=STEPS,
        batch_size=BATCH,
        learning_rate=LR,
        checkpoint_every=EVERY,
        seed=0,
        unet_config=tiny_config(),
        warmup_steps=0,
        lr_schedule="constant",
        progress=False,
    )
    return train_ddpm(images, out, **{**args, **kw})


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one thread is faster, and far faster on a busy machine (no spin-waiting)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def digits8() -> np.ndarray:
    return load_digits_images(8)[:N]


@pytest.fixture(scope="module")
def run(tmp_path_factory, digits8):
    """One tiny run, with the in-memory UNet's output on a probe recorded at every checkpoint."""
    seen: dict[str, torch.Tensor] = {}
    save = training._save_checkpoint

    def recording(unet, path):
        with torch.no_grad():
            seen[path.parent.name] = unet(*probe()).sample.clone()
        save(unet, path)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(training, "_save_checkpoint", recording)
        result = train(digits8, tmp_path_factory.mktemp("run") / "ddpm")
    return result, seen


def test_load_digits_images():
    x8, x16 = load_digits_images(8), load_digits_images(16)
    assert x8.shape == (1797, 1, 8, 8) and x16.shape == (1797, 1, 16, 16)
    assert x16.dtype == np.float32 and x16.min() >= 0.0 and x16.max() <= 1.0
    from sklearn.datasets import load_digits

    np.testing.assert_array_equal(x8[:, 0], load_digits().images.astype(np.float32) / 16)


def test_writes_diffusers_training_layout(run):
    result, _ = run
    out = result.out_dir
    assert result.checkpoints == [out / f"checkpoint-{s}" for s in (10, 20, 30)]
    for ckpt in result.checkpoints:
        assert (ckpt / "unet" / "config.json").is_file()
        assert (ckpt / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert result.pipeline_dir == out
    for name in ("model_index.json", "unet", "scheduler", "train_config.json", "timestep_log.npz"):
        assert (out / name).exists(), name
    assert not list(out.glob("*.tmp"))
    assert result.learning_rate == LR and result.steps_between_checkpoints == EVERY
    assert len(result.losses) == STEPS


def test_checkpoints_load_with_plain_diffusers_and_match_the_trained_unet(run):
    result, seen = run
    x, t = probe()
    for ckpt in result.checkpoints:
        unet = UNet2DModel.from_pretrained(ckpt / "unet").eval()
        with torch.no_grad():
            assert torch.equal(unet(x, t).sample, seen[ckpt.name]), ckpt.name
    pipe = DDPMPipeline.from_pretrained(result.out_dir)
    assert isinstance(pipe.scheduler, DDPMScheduler)
    assert pipe.scheduler.config.num_train_timesteps == 1000
    assert pipe.scheduler.config.prediction_type == "epsilon"
    with torch.no_grad():
        assert torch.equal(pipe.unet.eval()(x, t).sample, seen[f"checkpoint-{STEPS}"])


def test_train_config_is_sorted_json_with_tracin_weights(run):
    result, _ = run
    text = (result.out_dir / "train_config.json").read_text()
    cfg = json.loads(text)
    assert text == json.dumps(cfg, indent=2, sort_keys=True) + "\n"
    assert cfg["checkpoint_steps"] == [10, 20, 30]
    assert (cfg["learning_rate"], cfg["steps"], cfg["batch_size"], cfg["seed"], cfg["N"]) == (
        LR,
        STEPS,
        BATCH,
        0,
        N,
    )
    assert cfg["optimizer"]["name"] == "AdamW"
    assert cfg["unet"]["block_out_channels"] == [8, 16]
    assert cfg["tracin_weights"] == pytest.approx([LR * EVERY] * 3, rel=1e-12)


def test_tracin_weights_sum_the_learning_rates_under_warmup():
    lrs = training._learning_rates(1e-3, 25, warmup=4, schedule="constant")
    assert lrs[:5] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3])
    cos = training._learning_rates(1e-3, 25, warmup=0, schedule="cosine")
    assert cos[0] == pytest.approx(1e-3) and cos[-1] < 1e-5 and np.all(np.diff(cos) <= 0)


def test_timestep_log_records_every_step(run):
    result, _ = run
    with np.load(result.out_dir / "timestep_log.npz") as log:
        step, idx, ts, loss = log["step"], log["indices"], log["timesteps"], log["loss"]
    assert step.tolist() == list(range(1, STEPS + 1))
    assert idx.shape == ts.shape == (STEPS, BATCH)
    assert ts.min() >= 0 and ts.max() < 1000 and len(np.unique(ts)) > 100
    assert idx.min() >= 0 and idx.max() < N
    # each epoch (N / BATCH = 4 steps) visits every image once
    assert sorted(idx[:4].ravel().tolist()) == list(range(N))
    np.testing.assert_allclose(loss, result.losses)


def test_loss_decreases(run):
    losses = np.array(run[0].losses)
    assert losses[-10:].mean() < 0.7 * losses[:10].mean()


def test_same_seed_same_weights_other_seed_other_weights(run, digits8, tmp_path):
    result, _ = run
    again = train(digits8, tmp_path / "again")
    other = train(digits8, tmp_path / "other", seed=1)
    ref = UNet2DModel.from_pretrained(result.checkpoints[-1] / "unet").state_dict()
    same = UNet2DModel.from_pretrained(again.checkpoints[-1] / "unet").state_dict()
    diff = UNet2DModel.from_pretrained(other.checkpoints[-1] / "unet").state_dict()
    assert all(torch.equal(ref[k], same[k]) for k in ref)
    assert not all(torch.equal(ref[k], diff[k]) for k in ref)
    assert again.losses == result.losses


def test_finished_run_is_reused_and_another_run_refused(run, digits8, monkeypatch):
    result, _ = run

    def no_training(*args):
        raise AssertionError("retrained a finished run")

    monkeypatch.setattr(training, "_save_checkpoint", no_training)
    reused = train(digits8, result.out_dir)
    assert reused == result
    with pytest.raises(ModelError, match=r"another training run \(differs in: learning_rate\)"):
        train(digits8, result.out_dir, learning_rate=1e-4)
    with pytest.raises(ModelError, match="data_sha256"):
        train(1.0 - digits8, result.out_dir)


def test_interrupted_run_does_not_look_finished(digits8, tmp_path, monkeypatch):
    save = training._save_checkpoint

    def interrupt_at_20(unet, path):
        if path.parent.name == "checkpoint-20":
            raise KeyboardInterrupt
        save(unet, path)

    monkeypatch.setattr(training, "_save_checkpoint", interrupt_at_20)
    with pytest.raises(KeyboardInterrupt):
        train(digits8, tmp_path / "run")
    assert not (tmp_path / "run" / "train_config.json").exists()
    monkeypatch.setattr(training, "_save_checkpoint", save)
    result = train(digits8, tmp_path / "run", checkpoint_every=15)  # another run: not refused
    assert [p.name for p in sorted((tmp_path / "run").glob("checkpoint-*"))] == [
        "checkpoint-15",
        "checkpoint-30",
    ]
    assert result.checkpoints[-1].name == "checkpoint-30"


def test_bad_input_is_refused(digits8, tmp_path):
    with pytest.raises(DataError, match=r"in \[0, 1\]"):
        train(digits8 * 255, tmp_path / "a")
    with pytest.raises(DataError, match="N, C, H, W"):
        train(digits8[:, 0], tmp_path / "b")
    with pytest.raises(DataError, match="sample_size"):
        train(load_digits_images(16)[:8], tmp_path / "c")
    with pytest.raises(DataError, match="lr_schedule"):
        train(digits8, tmp_path / "d", lr_schedule="linear")
    with pytest.raises(ModelError, match="norm_num_groups=8 must divide"):
        small_unet_config(block_out_channels=(12, 24))


def test_sample_images(run):
    out = run[0].pipeline_dir
    a = sample_images(out, 3, seed=5, num_inference_steps=4, sampler="ddim")
    b = sample_images(out, 3, seed=5, num_inference_steps=4, sampler="ddim")
    c = sample_images(out, 2, seed=5, num_inference_steps=4, sampler="ddpm")
    assert a.shape == (3, 1, 8, 8) and c.shape == (2, 1, 8, 8) and a.dtype == np.float32
    assert a.min() >= 0 and a.max() <= 1
    np.testing.assert_array_equal(a, b)
    with pytest.raises(DataError, match="sampler"):
        sample_images(out, 1, sampler="euler")


def test_cli_trains_on_an_array_file(tmp_path, digits8):
    spec = importlib.util.spec_from_file_location("train_ddpm_tool", TOOL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    data = tmp_path / "x.npy"
    np.save(data, (digits8[:20, 0] * 255).astype(np.uint8))  # [N, H, W] uint8
    opts = "--steps 6 --batch-size 8 --checkpoint-every 2 --warmup-steps 3 --channels 8,16 --quiet"
    args = ["--out", str(tmp_path / "cli"), "--data", str(data), *opts.split()]
    res = CliRunner().invoke(tool.main, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output)
    assert [Path(p).name for p in summary["checkpoints"]] == [f"checkpoint-{i}" for i in (2, 4, 6)]
    # default cosine schedule after warmup: each weight sums the learning rates actually used
    cfg = json.loads((tmp_path / "cli" / "train_config.json").read_text())
    with np.load(tmp_path / "cli" / "timestep_log.npz") as log:
        lr = log["lr"]
    assert cfg["lr_schedule"] == "cosine" and lr[2] == cfg["learning_rate"] and lr[5] < lr[3]
    assert cfg["tracin_weights"] == pytest.approx(lr.reshape(3, 2).sum(1).tolist())
    np.save(data, digits8[:20, 0] * 2)  # floats outside [0, 1]
    res = CliRunner().invoke(tool.main, [str(a) for a in [*args[:2], "--data", data]])
    assert res.exit_code == 1
    assert res.output.startswith("Error: images must be in [0, 1], got values in [0, 2]")
