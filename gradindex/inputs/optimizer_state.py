"""Adam second moments from a training checkpoint's optimizer state: the preconditioner of
``BuildSpec(precondition="adam")`` (TrackStar, Chang et al. 2024).

Holds:
- ``find_optimizer_file(folder)``: the ``optimizer.bin`` of a checkpoint folder — accelerate's
  ``checkpoint-<step>/{unet/, optimizer.bin}`` (given the checkpoint or its ``unet/``), or a
  pipeline folder holding one.
- ``read_optimizer_state(path)``: ``torch.load(..., weights_only=True)`` of that file, checked.
- ``adam_scales(model, state, origin)``: per parameter name, s = 1 / (sqrt(v̂) + eps) with
  v̂ = exp_avg_sq / (1 - β2^step) (the bias-corrected second moment Adam divides by), β2 and eps
  from the parameter's ``param_groups`` entry; and a digest of the scales, which joins the
  checkpoint's fingerprint so an index refuses another optimizer state as it refuses other
  weights.

The optimizer's ``state`` keys are the positions of its parameters in the order they were
given (``param_groups[*]["params"]``): all of ``model.parameters()`` (full training), or the
trainable ones (LoRA / partial fine-tuning); which of the two is decided by the count, and
every shape is checked.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from gradindex.errors import ModelError

OPTIMIZER_FILE = "optimizer.bin"


def find_optimizer_file(folder: Path) -> Path:
    """``folder/optimizer.bin``, else the parent's when ``folder`` is the ``unet/`` (or an EMA
    run's ``unet_ema/``) of an accelerate checkpoint; ModelError when neither exists."""
    candidates = [folder / OPTIMIZER_FILE]
    if folder.name in ("unet", "unet_ema"):  # the raw or EMA weights of a checkpoint
        candidates.append(folder.parent / OPTIMIZER_FILE)
    for path in candidates:
        if path.is_file():
            return path
    raise ModelError(
        f"{folder}: no {OPTIMIZER_FILE} for precondition='adam' (looked in "
        f"{', '.join(str(p.parent) for p in candidates)}); give checkpoint folders saved with "
        "their optimizer state (accelerate save_state) or build with precondition='none'"
    )


def read_optimizer_state(path: Path) -> Any:
    """What ``path`` holds, loaded with ``weights_only=True`` (tensors and plain containers,
    no code run); ``adam_scales`` checks it is an optimizer ``state_dict``."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickle / zip errors of any kind: one line
        raise ModelError(
            f"{path}: not a readable optimizer state ({str(exc).splitlines()[0]})"
        ) from None
    return state


def adam_scales(
    model: torch.nn.Module, state: dict[str, Any], origin: str
) -> tuple[dict[str, torch.Tensor], str]:
    """Per parameter name of ``model``, the scale 1 / (sqrt(v̂) + eps) (float32, the
    parameter's shape), for every parameter that has an Adam second moment; and a 16-hex digest
    of them. ``origin`` names the state in errors."""
    if not isinstance(state, dict) or "state" not in state or "param_groups" not in state:
        raise ModelError(
            f"{origin}: not an optimizer state_dict (no 'state' / 'param_groups'); give the "
            "checkpoint's torch.save(optimizer.state_dict())"
        )
    groups = state["param_groups"]
    positions = [(i, g) for g in groups for i in g.get("params", [])]
    named = list(model.named_parameters())
    trainable = [(n, p) for n, p in named if p.requires_grad]
    if len(positions) == len(named):
        given = named
    elif len(positions) == len(trainable):
        given = trainable
    else:
        raise ModelError(
            f"{origin}: the optimizer holds {len(positions)} parameters but the model has "
            f"{len(named)} ({len(trainable)} trainable); the optimizer state is of another model"
        )
    scales: dict[str, torch.Tensor] = {}
    h = hashlib.sha256()
    for (pos, group), (name, param) in zip(positions, given, strict=True):
        entry = state["state"].get(pos)
        if entry is None:  # never stepped (no gradient in training): no scale, refused if selected
            continue
        v = entry.get("exp_avg_sq") if isinstance(entry, dict) else None
        if not isinstance(v, torch.Tensor) or "step" not in entry:
            raise ModelError(
                f"{origin}: parameter {pos} ({name}) has no exp_avg_sq / step: not an Adam "
                "optimizer state; build with precondition='none'"
            )
        if tuple(v.shape) != tuple(param.shape):
            raise ModelError(
                f"{origin}: exp_avg_sq {pos} has shape {tuple(v.shape)} but parameter {name} "
                f"has {tuple(param.shape)}; the optimizer state is of another model"
            )
        step = float(entry["step"])
        if not step > 0:
            raise ModelError(f"{origin}: parameter {pos} ({name}) has step {step}: never updated")
        beta2 = float(group.get("betas", (0.9, 0.999))[1])
        eps = float(group.get("eps", 1e-8))
        v_hat = v.detach().to(torch.float64) / (1.0 - beta2**step)
        s = (1.0 / (v_hat.sqrt() + eps)).to(torch.float32)
        scales[name] = s
        h.update(f"{name}:{tuple(s.shape)}".encode())
        h.update(s.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return scales, h.hexdigest()[:16]


def flat_scale(
    scales: dict[str, torch.Tensor], names: list[str], origin: str, device: torch.device
) -> torch.Tensor:
    """The scales of parameters ``names`` flattened side by side: [p], the featurizer's
    column order. ModelError naming the first parameter that has none."""
    missing = [n for n in names if n not in scales]
    if missing:
        raise ModelError(
            f"{origin}: the optimizer state has no second moment for parameter {missing[0]} "
            f"(+{len(missing) - 1} more); leave it out with params= or build with "
            "precondition='none'"
        )
    return torch.cat([scales[n].reshape(-1) for n in names]).to(device)
