"""A small, deterministic DDPM trainer for the demo, the benchmarks and the tests.

Holds:
- ``load_digits_images(size)``: scikit-learn's 1,797 real 8x8 digits as float [N, 1, size, size]
  in [0, 1].
- ``small_unet_config(...)``: a ``UNet2DModel`` config that trains on 2 CPU cores in minutes.
- ``train_ddpm(images, out_dir, ...)`` -> ``TrainResult``: epsilon-prediction DDPM training
  (``DDPMScheduler``, MSE, AdamW) that writes the layout of diffusers'
  ``examples/unconditional_image_generation/train_unconditional.py``::

      out_dir/checkpoint-<step>/unet/    UNet save_pretrained, one per checkpoint step
      out_dir/checkpoint-<step>/optimizer.bin   torch.save(optimizer.state_dict()) (accelerate's)
      out_dir/model_index.json, unet/, scheduler/   the final DDPMPipeline
      out_dir/timestep_log.npz           per optimizer step: batch indices, timesteps, loss, lr
      out_dir/train_config.json          settings + TracIn weights; written last = run finished

  A finished folder with the same settings is reused; one with other settings is refused.

Generating images from the trained pipeline: ``gradindex.demo.sampling``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from gradindex import __version__
from gradindex.errors import DataError, ModelError

logger = logging.getLogger(__name__)

CONFIG_NAME = "train_config.json"
TIMESTEP_LOG_NAME = "timestep_log.npz"
OPTIMIZER_FILE = "optimizer.bin"  # accelerate's name (gradindex.inputs.optimizer_state reads it)
FORMAT = "gradindex-ddpm-train/1"
LR_SCHEDULES = ("constant", "cosine")
OPTIMIZER = {
    "name": "AdamW",
    "betas": (0.9, 0.999),
    "eps": 1e-8,
    "weight_decay": 1e-2,
    "max_grad_norm": 1.0,
}


def load_digits_images(size: int = 16) -> np.ndarray:
    """scikit-learn's ``load_digits`` (1,797 real 8x8 digits, values 0..16) as float32
    [N, 1, size, size] in [0, 1]; bilinearly upsampled when ``size != 8``."""
    from sklearn.datasets import load_digits

    if size < 1:
        raise DataError(f"size must be >= 1, got {size}")
    x = torch.from_numpy(load_digits().images.astype(np.float32) / 16.0)[:, None]  # [N, 1, 8, 8]
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.clamp_(0.0, 1.0).numpy()


def small_unet_config(
    sample_size: int = 16,
    channels: int = 1,
    block_out_channels: tuple[int, ...] = (16, 32, 64),
    norm_num_groups: int = 8,
) -> dict[str, Any]:
    """A ``UNet2DModel`` config small enough to train on 2 CPU cores in a few minutes.

    One ResNet per down block, plain convolutions (no attention), a down block per entry of
    ``block_out_channels``; the defaults give 619,697 parameters at 16x16, and ``train_ddpm``'s
    defaults (1,200 steps of 32) train them on the digits in ~230 s of one CPU core.
    """
    chans = [int(c) for c in block_out_channels]
    bad = [c for c in chans if c % norm_num_groups]
    if bad:
        raise ModelError(
            f"norm_num_groups={norm_num_groups} must divide every block_out_channels entry "
            f"(not {bad})"
        )
    return {
        "sample_size": int(sample_size),
        "in_channels": int(channels),
        "out_channels": int(channels),
        "layers_per_block": 1,
        "block_out_channels": chans,
        "down_block_types": ["DownBlock2D"] * len(chans),
        "up_block_types": ["UpBlock2D"] * len(chans),
        "norm_num_groups": int(norm_num_groups),
        "add_attention": False,
    }


@dataclass(frozen=True)
class TrainResult:
    """A finished training run in ``out_dir``."""

    out_dir: Path
    checkpoints: list[Path]  # the checkpoint-<step> folders, in step order
    pipeline_dir: Path  # the final DDPMPipeline folder (= out_dir)
    learning_rate: float
    steps_between_checkpoints: int
    losses: list[float]  # one per optimizer step
    tracin_weights: list[float]  # per checkpoint: sum of the learning rates since the previous

    @property
    def unet_dirs(self) -> list[Path]:
        """The ``checkpoint-<step>/unet`` model folders, in step order."""
        return [p / "unet" for p in self.checkpoints]


def train_ddpm(
    images: np.ndarray,
    out_dir: str | Path,
    *,
    steps: int = 1200,
    batch_size: int = 32,
    learning_rate: float = 4e-3,
    checkpoint_every: int = 300,
    seed: int = 0,
    unet_config: dict | None = None,
    num_train_timesteps: int = 1000,
    warmup_steps: int = 20,
    lr_schedule: str = "cosine",
    progress: bool = True,
) -> TrainResult:
    """Train a DDPM (epsilon prediction, MSE, AdamW) on ``images`` and save it in ``out_dir``.

    images: float [N, C, H, W] in [0, 1] (mapped to [-1, 1] for training).
    Checkpoints are saved every ``checkpoint_every`` optimizer steps and at the last step. The
    learning rate warms up linearly over ``warmup_steps``, then follows ``lr_schedule``:
    ``"cosine"`` (to 0 at the last step, as in diffusers' example) or ``"constant"``. Each
    checkpoint's TracIn weight is the sum of the learning rates of the optimizer steps since the
    previous checkpoint (= ``learning_rate * checkpoint_every`` for a constant rate).
    Same arguments and seed -> identical weights (on the same device and thread count).
    """
    x = _validate_images(images)  # [N, C, H, W] float32 in [0, 1]
    counts = {
        "steps": steps,
        "batch_size": batch_size,
        "checkpoint_every": checkpoint_every,
        "num_train_timesteps": num_train_timesteps,
    }
    _check_numbers(counts, learning_rate, warmup_steps)
    lrs = _learning_rates(learning_rate, steps, warmup_steps, lr_schedule)  # [S]
    n, c, h, w = x.shape
    unet_config = _checked_unet_config(unet_config, c, h, w)
    ckpt_steps = list(range(checkpoint_every, steps + 1, checkpoint_every))
    if not ckpt_steps or ckpt_steps[-1] != steps:
        ckpt_steps.append(steps)
    bounds = [0, *ckpt_steps]
    settings = {
        "format": FORMAT,
        **{k: int(v) for k, v in counts.items()},
        "learning_rate": float(learning_rate),
        "checkpoint_steps": ckpt_steps,
        "seed": int(seed),
        "warmup_steps": int(warmup_steps),
        "lr_schedule": lr_schedule,
        "N": int(n),
        "image_shape": [c, h, w],
        "data_sha256": hashlib.sha256(x.tobytes()).hexdigest(),
        "unet": unet_config,
        "optimizer": dict(OPTIMIZER),
        "tracin_weights": [float(sum(lrs[a:b])) for a, b in zip(bounds, bounds[1:])],
    }
    settings = json.loads(json.dumps(settings))  # exactly as saved and reread
    out = Path(out_dir)
    if (out / CONFIG_NAME).is_file():
        return _reuse(out, settings)
    return _train(out, x, settings, lrs, progress)


def _check_numbers(counts: dict[str, Any], learning_rate: float, warmup_steps: int) -> None:
    """Positive integer counts, a positive finite learning rate, a warmup of 0 or more."""
    for name, value in counts.items():
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise DataError(f"{name} must be a positive integer, got {value!r}")
    if not (learning_rate > 0 and math.isfinite(learning_rate)):
        raise DataError(f"learning_rate must be a positive number, got {learning_rate!r}")
    if warmup_steps < 0:
        raise DataError(f"warmup_steps must be >= 0, got {warmup_steps}")


def _checked_unet_config(unet_config: dict | None, c: int, h: int, w: int) -> dict[str, Any]:
    """The UNet config (the small default when None) in plain JSON types, as saved; its
    channels and sample size must be the images'."""
    if unet_config is None:
        unet_config = small_unet_config(sample_size=h, channels=c)
    unet_config = json.loads(json.dumps(dict(unet_config)))  # plain JSON types, as saved
    size = unet_config.get("sample_size")
    chans = (unet_config.get("in_channels"), unet_config.get("out_channels"))
    if chans != (c, c) or [h, w] not in ([size, size], size):
        raise DataError(
            f"images are [N, {c}, {h}, {w}] but unet_config has in/out_channels={chans}, "
            f"sample_size={size}"
        )
    return unet_config


def _train(
    out: Path, x: np.ndarray, settings: dict[str, Any], lrs: list[float], progress: bool
) -> TrainResult:
    """Train a new run with ``settings`` on x [N, C, H, W] in [0, 1] into ``out``: checkpoints,
    the final pipeline, the timestep log, then the config (last: marks the run finished)."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    seed, steps = settings["seed"], settings["steps"]
    with torch.random.fork_rng(devices=[]):  # model init under seed, caller's RNG untouched
        torch.manual_seed(seed)
        try:
            unet = UNet2DModel(**settings["unet"])
        except (TypeError, ValueError) as exc:
            raise ModelError(f"unet_config does not build a UNet2DModel: {exc}") from None
    scheduler = DDPMScheduler(num_train_timesteps=settings["num_train_timesteps"])
    if out.exists():
        for stale in sorted(out.glob("checkpoint-*")):  # left by an unfinished run
            logger.warning("removing %s, left by an unfinished run", stale)
            shutil.rmtree(stale)
    out.mkdir(parents=True, exist_ok=True)

    data = torch.from_numpy(x) * 2.0 - 1.0  # [N, C, H, W] in [-1, 1]
    save_at = {s: out / f"checkpoint-{s}" / "unet" for s in settings["checkpoint_steps"]}
    log = _fit(unet, scheduler, data, lrs, settings["batch_size"], seed, save_at, progress)
    DDPMPipeline(unet=unet.eval(), scheduler=scheduler).save_pretrained(out)
    _atomic_write(out / TIMESTEP_LOG_NAME, lambda f: np.savez(f, **log))

    import diffusers

    final_loss = float(log["loss"][-50:].mean())
    stamped = {
        **settings,
        "final_loss": final_loss,
        "gradindex_version": __version__,
        "diffusers_version": diffusers.__version__,
        "torch_version": torch.__version__,
    }
    text = json.dumps(stamped, indent=2, sort_keys=True) + "\n"
    _atomic_write(out / CONFIG_NAME, lambda f: f.write(text.encode()))  # last: marks it finished
    logger.info("trained %d steps into %s, final loss %.4f", steps, out, final_loss)
    return _result(out, stamped, log["loss"].tolist())


def _fit(
    unet: torch.nn.Module,
    scheduler: Any,
    data: torch.Tensor,
    lrs: list[float],
    batch_size: int,
    seed: int,
    save_at: dict[int, Path],
    progress: bool,
) -> dict[str, np.ndarray]:
    """The training loop over data [N, C, H, W] in [-1, 1], one optimizer step per entry of
    ``lrs``; saves the UNet at the steps in ``save_at``. Returns the timestep log arrays."""
    from tqdm.auto import tqdm

    steps, T = len(lrs), scheduler.config.num_train_timesteps
    opt_kw = {k: v for k, v in OPTIMIZER.items() if k not in ("name", "max_grad_norm")}
    opt = torch.optim.AdamW(unet.parameters(), lr=lrs[0], **opt_kw)
    gen = torch.Generator().manual_seed(seed)
    batches = _batches(len(data), batch_size, gen)
    log_idx = np.empty((steps, batch_size), np.int64)  # [S, B]
    log_t = np.empty((steps, batch_size), np.int64)  # [S, B]
    losses = np.empty(steps, np.float32)  # [S]
    unet.train()
    bar = tqdm(total=steps, desc="train ddpm", disable=not progress, unit="step")
    for s in range(steps):
        idx = next(batches)  # [B]
        x0 = data[idx]  # [B, C, H, W]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, T, (batch_size,), generator=gen)  # [B]
        loss = F.mse_loss(unet(scheduler.add_noise(x0, noise, t), t).sample, noise)
        for group in opt.param_groups:
            group["lr"] = lrs[s]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), OPTIMIZER["max_grad_norm"])
        opt.step()
        log_idx[s], log_t[s], losses[s] = idx.numpy(), t.numpy(), loss.item()
        bar.update(1)
        if s % 10 == 9 or s == steps - 1:
            bar.set_postfix(loss=f"{losses[max(0, s - 49) : s + 1].mean():.4f}")
        if s + 1 in save_at:
            _save_checkpoint(unet, save_at[s + 1])
            _save_optimizer(opt, save_at[s + 1].parent)
    bar.close()
    return {
        "step": np.arange(1, steps + 1),
        "indices": log_idx,
        "timesteps": log_t,
        "loss": losses,
        "lr": np.asarray(lrs),
    }


def _learning_rates(lr: float, steps: int, warmup: int, schedule: str) -> list[float]:
    """The learning rate of every optimizer step: linear warmup, then constant or cosine to 0."""
    if schedule not in LR_SCHEDULES:
        raise DataError(f"lr_schedule must be one of {LR_SCHEDULES}, got {schedule!r}")
    out = []
    for s in range(steps):
        if s < warmup:
            out.append(lr * (s + 1) / warmup)
        elif schedule == "cosine":
            out.append(lr * 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup))))
        else:
            out.append(lr)
    return out


def _validate_images(images: np.ndarray) -> np.ndarray:
    if not isinstance(images, np.ndarray) or images.ndim != 4:
        shape = getattr(images, "shape", None)
        raise DataError(f"images must be a numpy array [N, C, H, W], got shape {shape}")
    if images.shape[0] < 1 or not np.issubdtype(images.dtype, np.floating):
        raise DataError(
            f"images must be a non-empty float array, got {images.dtype} {images.shape}"
        )
    x = np.ascontiguousarray(images, dtype=np.float32)
    if not np.isfinite(x).all():
        raise DataError("images contain NaN or infinite values")
    lo, hi = float(x.min()), float(x.max())
    if lo < -1e-6 or hi > 1 + 1e-6:
        raise DataError(f"images must be in [0, 1], got values in [{lo:.3g}, {hi:.3g}]")
    return x


def _batches(n: int, batch_size: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    """Batches [B] of dataset indices, epoch after epoch, each epoch a fresh permutation (a
    batch may straddle two epochs; with B > N an image can appear twice in a batch)."""
    pool = torch.empty(0, dtype=torch.long)
    while True:
        while len(pool) < batch_size:
            pool = torch.cat([pool, torch.randperm(n, generator=gen)])
        yield pool[:batch_size]
        pool = pool[batch_size:]


def _save_checkpoint(unet: torch.nn.Module, path: Path) -> None:
    unet.save_pretrained(path)


def _save_optimizer(opt: torch.optim.Optimizer, folder: Path) -> None:
    """``checkpoint-<step>/optimizer.bin`` as accelerate writes it (reads the state only)."""
    _atomic_write(folder / OPTIMIZER_FILE, lambda f: torch.save(opt.state_dict(), f))


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
    os.replace(tmp, path)


def _reuse(out: Path, settings: dict) -> TrainResult:
    """The finished run in ``out`` if it was trained with ``settings``; else ModelError."""
    try:
        existing = json.loads((out / CONFIG_NAME).read_text())
    except json.JSONDecodeError as exc:
        raise ModelError(f"{out / CONFIG_NAME} is not valid JSON ({exc})") from None
    if not isinstance(existing, dict) or existing.get("format") != FORMAT:
        raise ModelError(f"{out} holds something other than a gradindex training run")
    derived = ("checkpoint_steps", "tracin_weights")  # follow from the others
    differ = sorted(k for k in settings if k not in derived and existing.get(k) != settings[k])
    if differ:
        raise ModelError(
            f"{out} holds another training run (differs in: {', '.join(differ)}); "
            "pick another folder or delete this one"
        )
    with np.load(out / TIMESTEP_LOG_NAME) as log:
        result = _result(out, existing, log["loss"].tolist())
    missing = [p for p in [*result.unet_dirs, out / "model_index.json"] if not p.exists()]
    if missing:
        raise ModelError(
            f"{out}: the finished run lacks {missing[0]}; delete the folder to retrain"
        )
    logger.info("reusing the finished training run in %s", out)
    return result


def _result(out: Path, cfg: dict, losses: list[float]) -> TrainResult:
    return TrainResult(
        out_dir=out,
        checkpoints=[out / f"checkpoint-{s}" for s in cfg["checkpoint_steps"]],
        pipeline_dir=out,
        learning_rate=float(cfg["learning_rate"]),
        steps_between_checkpoints=int(cfg["checkpoint_every"]),
        losses=losses,
        tracin_weights=[float(v) for v in cfg["tracin_weights"]],
    )
