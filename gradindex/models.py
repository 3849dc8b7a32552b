"""Checkpoints: load diffusers models and schedulers, fingerprint their weights.

Holds:
- ``Checkpoint``: one (model, scheduler) pair with its source and weight fingerprint.
- ``load_checkpoint(source, scheduler=None)``: a diffusers pipeline folder (``unet/`` +
  ``scheduler/``), a model folder (``config.json`` + weights; the layout of diffusers' training
  scripts' ``checkpoint-<step>/unet``), a LoRA folder (``pytorch_lora_weights.safetensors``
  on a base UNet, see ``gradindex.lora``), or an in-memory ``(module, scheduler)`` pair.
- ``fingerprint_module``: sha256 over parameter names and bytes — the same for a module in
  memory and the folder it was saved to, so queries can check they use the index's weights.
- ``model_output``: call any ``(x_t, t, **cond) -> output`` module and get a tensor back.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gradindex.errors import ModelError

logger = logging.getLogger(__name__)

CheckpointSource = Any  # str | os.PathLike | tuple[torch.nn.Module, scheduler] | Checkpoint


@dataclass
class Checkpoint:
    """A model and its noise scheduler at one point of training."""

    model: torch.nn.Module
    scheduler: Any
    source: str  # folder path, or "memory:<i>" for in-memory pairs
    fingerprint: str

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
    source: CheckpointSource, scheduler: Any = None, index: int = 0, base_model: Any = None
) -> Checkpoint:
    """Load one checkpoint. ``scheduler`` (an object or a folder) is used when the checkpoint
    folder holds no ``scheduler/`` of its own. A folder holding only LoRA weights
    (``gradindex.lora``) adapts the UNet of ``base_model``."""
    if isinstance(source, Checkpoint):
        return source
    if isinstance(source, tuple) and len(source) == 2 and isinstance(source[0], torch.nn.Module):
        model, sched = source
        model = model.eval()
        return Checkpoint(model, _as_scheduler(sched), f"memory:{index}", fingerprint_module(model))
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
    from gradindex.lora import is_lora_folder, load_lora_unet

    if is_lora_folder(folder):
        model = load_lora_unet(folder, base_model)
        base = Path(base_model) if isinstance(base_model, (str, os.PathLike)) else None
        sched = _find_scheduler(folder, scheduler, base)
        return Checkpoint(model, sched, str(folder.resolve()), fingerprint_module(model))
    model_dir = folder / "unet" if (folder / "unet" / "config.json").exists() else folder
    if not (model_dir / "config.json").exists():
        raise ModelError(
            f"{folder}: neither unet/config.json nor config.json found; not a diffusers model"
        )
    model = _load_model(model_dir)
    sched = _find_scheduler(folder, scheduler)
    return Checkpoint(model, sched, str(folder.resolve()), fingerprint_module(model))


def load_checkpoints(
    sources: list[CheckpointSource], scheduler: Any = None, base_model: Any = None
) -> list[Checkpoint]:
    if not sources:
        raise ModelError("no checkpoints given: pass at least one checkpoint")
    ckpts = [load_checkpoint(s, scheduler, i, base_model) for i, s in enumerate(sources)]
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


def _load_model(model_dir: Path) -> torch.nn.Module:
    import diffusers

    cls_name = json.loads((model_dir / "config.json").read_text()).get("_class_name", "UNet2DModel")
    cls = diffusers_class(cls_name, diffusers.ModelMixin)
    if cls is None:
        raise ModelError(
            f"{model_dir}/config.json: _class_name {cls_name!r} is not a diffusers model class "
            "(a ModelMixin such as UNet2DModel); point at the model's folder, e.g. unet/"
        )
    try:
        model = cls.from_pretrained(model_dir, low_cpu_mem_usage=False)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelError(
            f"{model_dir}: could not load the model ({str(exc).splitlines()[0]})"
        ) from None
    return model.eval()


def _find_scheduler(folder: Path, given: Any, base: Path | None = None) -> Any:
    extra = [base / "scheduler"] if base is not None else []
    for cand in (folder / "scheduler", folder.parent / "scheduler", *extra):
        if (cand / "scheduler_config.json").exists():
            if cand.parent != folder:
                logger.info("%s: using the scheduler of the training run in %s", folder, cand)
            return _load_scheduler(cand)
    if given is not None:
        return _as_scheduler(given)
    raise ModelError(
        f"{folder}: no scheduler/ folder next to the model; pass a scheduler (--scheduler DIR)"
    )


def _as_scheduler(sched: Any) -> Any:
    if isinstance(sched, (str, os.PathLike)):
        p = Path(sched)
        p = p / "scheduler" if (p / "scheduler" / "scheduler_config.json").exists() else p
        return _load_scheduler(p)
    if not hasattr(sched, "config") or not hasattr(sched.config, "num_train_timesteps"):
        raise ModelError(f"{type(sched).__name__} is not a diffusers scheduler")
    return sched


def _load_scheduler(path: Path) -> Any:
    import diffusers

    cfg_file = path / "scheduler_config.json"
    if not cfg_file.exists():
        raise ModelError(f"{path}: no scheduler_config.json")
    cls_name = json.loads(cfg_file.read_text()).get("_class_name", "DDPMScheduler")
    cls = diffusers_class(cls_name, diffusers.SchedulerMixin)
    if cls is None:
        if str(cls_name) in dir(diffusers):  # names something else of diffusers
            raise ModelError(
                f"{cfg_file}: _class_name {cls_name!r} is not a diffusers scheduler class"
            )
        cls = diffusers.DDPMScheduler  # a scheduler of a newer diffusers: DDPM reads its config
    return cls.from_pretrained(path)


def diffusers_class(name: Any, base: type) -> type | None:
    """The diffusers class called ``name`` if it is a subclass of ``base`` (``ModelMixin``,
    ``SchedulerMixin``), else None: a config file must not make us build a pipeline or call
    any other attribute of the diffusers module."""
    import diffusers

    if not isinstance(name, str) or not name.isidentifier():
        return None
    try:
        cls = getattr(diffusers, name, None)
    except (ImportError, RuntimeError):  # lazy attributes whose extras are not installed
        return None
    return cls if isinstance(cls, type) and issubclass(cls, base) else None


def fingerprint_module(model: torch.nn.Module) -> str:
    """sha256 of every parameter and buffer (name, dtype, shape, bytes), in name order."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


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
