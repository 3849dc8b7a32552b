"""Checkpoints: load diffusers models and schedulers, fingerprint their weights.

Holds:
- ``Checkpoint``: one (model, scheduler) pair with its source and weight fingerprint.
- ``load_checkpoint(source, scheduler=None)``: a diffusers pipeline folder (``unet/`` +
  ``scheduler/``), a model folder (``config.json`` + weights; the layout of diffusers' training
  scripts' ``checkpoint-<step>/unet``), a LoRA folder (``pytorch_lora_weights.safetensors``
  on a base UNet, see ``gradindex.inputs.lora``), or an in-memory ``(module, scheduler)`` pair
  (``(module, scheduler, optimizer_state_dict)`` for ``precondition="adam"``).
- ``load_checkpoints(sources, ..., precondition, weights)``: several, checked to share a
  scheduler and to differ in weights; with ``precondition="adam"`` each carries its Adam scales
  (``gradindex.inputs.optimizer_state``) and a fingerprint that covers them; ``weights`` picks
  the raw or EMA weights of a training run's folders (``gradindex.inputs.runs``).
- ``with_model(checkpoints, model)``: state dicts / weight files applied to a copy of ``model``.
- ``fingerprint_module`` (``gradindex.inputs.components``): sha256 over parameter names and bytes — the same for a module in
  memory and the folder it was saved to, so queries can check they use the index's weights.
- ``model_output``: call any ``(x_t, t, **cond) -> output`` module and get a tensor back.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from gradindex.errors import ModelError
from gradindex.inputs.components import fingerprint_module, load_model, load_scheduler
from gradindex.inputs.lora import is_lora_folder, load_lora_unet
from gradindex.inputs.optimizer_state import adam_scales, find_optimizer_file, read_optimizer_state
from gradindex.inputs.runs import model_folder, scheduler_folders

logger = logging.getLogger(__name__)

CheckpointSource = Any  # str | os.PathLike | tuple[torch.nn.Module, scheduler] | Checkpoint


@dataclass
class Checkpoint:
    """A model and its noise scheduler at one point of training."""

    model: torch.nn.Module
    scheduler: Any
    source: str  # folder path, or "memory:<i>" for in-memory pairs
    fingerprint: str  # of the weights (and of the Adam scales when they are set)
    optimizer_state: dict[str, Any] | None = None  # given in memory with the model
    scales: dict[str, torch.Tensor] | None = None  # Adam 1/(sqrt(v̂)+eps) per parameter name
    weights: str | None = None  # "raw" / "ema" where the run's layout says; None: not a run's
    scheduler_source: str | None = None  # the folder its noise scheduler was read from

    @property
    def prediction_type(self) -> str:
        return str(getattr(self.scheduler.config, "prediction_type", "epsilon"))

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    def sample_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the model's input, from its diffusers config."""
        cfg = getattr(self.model, "config", None)
        if cfg is None or getattr(cfg, "in_channels", None) is None:
            raise ModelError(
                f"{self.source}: the model has no diffusers config with in_channels/sample_size; "
                "use a diffusers UNet2DModel or pass sample_shape explicitly"
            )
        size = cfg.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return (int(cfg.in_channels), int(h), int(w))


def load_checkpoint(
    source: CheckpointSource,
    scheduler: Any = None,
    index: int = 0,
    base_model: Any = None,
    weights: str | None = "raw",
) -> Checkpoint:
    """Load one checkpoint. ``scheduler`` (an object or a folder), when given, is used
    instead of the run's own ``scheduler/``. A folder holding only LoRA weights
    (``gradindex.inputs.lora``) adapts the UNet of ``base_model``. ``weights``: 'raw' or 'ema'
    (``gradindex.inputs.runs``): which weights of a training run's folder are loaded."""
    if isinstance(source, Checkpoint):
        return source
    if (
        isinstance(source, tuple)
        and len(source) in (2, 3)
        and isinstance(source[0], torch.nn.Module)
    ):
        model, sched, *opt = source
        if opt and not isinstance(opt[0], dict):
            raise ModelError(
                f"memory:{index}: the third item must be the optimizer's state_dict(), got a "
                f"{type(opt[0]).__name__}"
            )
        model = model.eval()
        return Checkpoint(
            model,
            _as_scheduler(sched),
            f"memory:{index}",
            fingerprint_module(model),
            optimizer_state=opt[0] if opt else None,
        )
    if isinstance(source, torch.nn.Module):
        if scheduler is None:
            raise ModelError("an in-memory model needs a scheduler: pass (model, scheduler) pairs")
        return Checkpoint(
            source.eval(), _as_scheduler(scheduler), f"memory:{index}", fingerprint_module(source)
        )
    if not isinstance(source, (str, os.PathLike)):
        raise ModelError(
            f"cannot load a checkpoint from a {type(source).__name__}: give a diffusers folder "
            "or a (model, scheduler) pair"
        )
    folder = Path(source)
    if not folder.is_dir():
        raise ModelError(f"{folder}: no such checkpoint folder")
    if is_lora_folder(folder):
        model = load_lora_unet(folder, base_model)
        base = Path(base_model) if isinstance(base_model, (str, os.PathLike)) else None
        sched, where = _find_scheduler(folder, scheduler, base)
        fp = fingerprint_module(model)
        return Checkpoint(model, sched, str(folder.resolve()), fp, scheduler_source=where)
    model_dir, kind = model_folder(folder, weights)
    if not (model_dir / "config.json").exists():
        raise ModelError(
            f"{folder}: neither unet/config.json nor config.json found; not a diffusers model"
        )
    model = load_model(model_dir)
    sched, where = _find_scheduler(folder, scheduler)
    return Checkpoint(
        model, sched, str(folder.resolve()), fingerprint_module(model), weights=kind,
        scheduler_source=where,
    )  # fmt: skip


def load_checkpoints(
    sources: list[CheckpointSource],
    scheduler: Any = None,
    base_model: Any = None,
    precondition: str = "none",
    weights: str | None = "raw",
) -> list[Checkpoint]:
    """``precondition="adam"``: each checkpoint also reads its optimizer state (see
    ``with_adam_scales``). ``weights``: 'raw' or 'ema' for every checkpoint of a training run
    (``gradindex.inputs.runs``). Two checkpoints holding the same weights are refused: a run
    that ended at a checkpoint saves the same weights again in its output folder, and TracIn
    would count them twice."""
    if not sources:
        raise ModelError("no checkpoints given: pass at least one checkpoint")
    ckpts = [load_checkpoint(s, scheduler, i, base_model, weights) for i, s in enumerate(sources)]
    _refuse_repeats(ckpts)
    if precondition == "adam":
        ckpts = [with_adam_scales(c) for c in ckpts]
    first = ckpts[0]
    for c in ckpts[1:]:
        if (
            c.num_train_timesteps != first.num_train_timesteps
            or c.prediction_type != first.prediction_type
        ):
            raise ModelError(
                f"{c.source}: scheduler differs from {first.source} (num_train_timesteps / "
                "prediction_type); all checkpoints must share one scheduler setup"
            )
    return ckpts


def with_adam_scales(ckpt: Checkpoint) -> Checkpoint:
    """``ckpt`` with its Adam scales, read from the optimizer state given with it in memory or
    the folder's ``optimizer.bin``; its fingerprint then covers the scales, so an index built
    with them refuses another optimizer state as it refuses other weights."""
    if ckpt.scales is not None:
        return ckpt
    if ckpt.optimizer_state is not None:
        state, origin = ckpt.optimizer_state, f"{ckpt.source} optimizer state"
    elif ckpt.source.startswith("memory:"):
        raise ModelError(
            f"{ckpt.source}: precondition='adam' needs the optimizer state: pass "
            "(model, scheduler, optimizer.state_dict()) or a checkpoint folder with optimizer.bin"
        )
    else:
        path = find_optimizer_file(Path(ckpt.source))
        state, origin = read_optimizer_state(path), str(path)
    scales, digest = adam_scales(ckpt.model, state, origin)
    fingerprint = hashlib.sha256(f"{ckpt.fingerprint}+adam:{digest}".encode()).hexdigest()[:16]
    return dataclasses.replace(ckpt, fingerprint=fingerprint, scales=scales, optimizer_state=None)


def _refuse_repeats(ckpts: list[Checkpoint]) -> None:
    """ModelError naming two checkpoint folders with equal weight fingerprints (in-memory
    models are the caller's own: one may be given twice on purpose)."""
    seen: dict[str, int] = {}
    for i, c in enumerate(ckpts):
        if c.source.startswith("memory:"):
            continue
        j = seen.setdefault(c.fingerprint, i)
        if j != i:
            raise ModelError(
                f"checkpoints {j} ({ckpts[j].source}) and {i} ({c.source}) hold the same weights "
                f"(fingerprint {c.fingerprint}): TracIn would count them twice (a run that ended "
                "at a checkpoint saves it again in its output folder); give each one once"
            )


def _find_scheduler(folder: Path, given: Any, base: Path | None = None) -> tuple[Any, str | None]:
    """The noise scheduler and the folder it came from: ``given`` when there is one (an
    explicit choice wins over the run's own), else the run's ``scheduler/``."""
    if given is not None:
        where = str(Path(given).resolve()) if isinstance(given, (str, os.PathLike)) else None
        return _as_scheduler(given), where
    extra = [base / "scheduler"] if base is not None else []
    for cand in (*scheduler_folders(folder), *extra):
        if (cand / "scheduler_config.json").exists():
            if cand.parent != folder:
                logger.info("%s: using the scheduler of the training run in %s", folder, cand)
            return load_scheduler(cand), str(cand.resolve())
    looked = ", ".join(str(c) for c in (*scheduler_folders(folder), *extra))
    raise ModelError(
        f"{folder}: no noise scheduler found (looked in {looked}); pass one (--scheduler DIR)"
    )


def _as_scheduler(sched: Any) -> Any:
    if isinstance(sched, (str, os.PathLike)):
        p = Path(sched)
        p = p / "scheduler" if (p / "scheduler" / "scheduler_config.json").exists() else p
        return load_scheduler(p)
    if not hasattr(sched, "config") or not hasattr(sched.config, "num_train_timesteps"):
        raise ModelError(f"{type(sched).__name__} is not a diffusers scheduler")
    return sched


def model_output(
    model: torch.nn.Module,
    x: torch.Tensor,
    t: torch.Tensor,
    cond: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Call ``model(x, t, **cond)`` and return the tensor (diffusers outputs carry it in
    ``.sample``). ``cond``: per-item conditioning keyword arguments, each with the items first
    (``class_labels`` [I], ``encoder_hidden_states`` [I, L, E])."""
    out = model(x, t, **cond) if cond else model(x, t)
    if hasattr(out, "sample"):
        return out.sample
    if isinstance(out, (tuple, list)):
        return out[0]
    return out


def with_model(checkpoints: list[CheckpointSource], model: torch.nn.Module | None) -> list:
    """State dicts / weight files become (module, scheduler)-less modules when a model is given."""
    if model is None:
        return list(checkpoints)
    out: list[Any] = []
    for c in checkpoints:
        if isinstance(c, dict) or (isinstance(c, (str, Path)) and Path(c).is_file()):
            state = c if isinstance(c, dict) else _load_state_file(Path(c))
            m = copy.deepcopy(model)
            try:
                m.load_state_dict(state)
            except RuntimeError as exc:
                raise ModelError(
                    f"checkpoint does not fit the model: {str(exc).splitlines()[0]}"
                ) from None
            out.append(m)
        else:
            out.append(c)
    return out


def _load_state_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)
