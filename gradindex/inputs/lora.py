"""LoRA checkpoints: a base UNet plus the adapter weights diffusers' LoRA scripts write.

Holds:
- ``LORA_WEIGHTS``: the file name diffusers' ``train_text_to_image_lora.py`` (and its siblings)
  write into every ``checkpoint-<step>/`` and the output folder
  (``StableDiffusionPipeline.save_lora_weights``).
- ``is_lora_folder(folder)``: a folder holding that file and no UNet of its own.
- ``load_lora_unet(folder, base_model)``: a fresh copy of the base UNet with the adapter
  injected (peft ``lora_A`` / ``lora_B`` layers, via diffusers' ``load_lora_adapter``), base
  weights frozen and adapter weights trainable — so the default parameter selection
  (``BuildSpec.params=None``: every trainable parameter) is the adapter only, and the
  projection runs over the adapter's parameters instead of the whole UNet's.

The hook backend differentiates the adapters directly: peft's LoRA layers are two ``Linear``
(or ``Conv2d``) modules around a frozen base layer, all of which it supports.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from gradindex.errors import ModelError
from gradindex.inputs.components import load_model

logger = logging.getLogger(__name__)

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
ADAPTER = "default"


def is_lora_folder(folder: Path) -> bool:
    """True for a folder with LoRA weights and no UNet config of its own."""
    return (folder / LORA_WEIGHTS).exists() and not (
        (folder / "unet" / "config.json").exists() or (folder / "config.json").exists()
    )


def base_unet(folder: Path, base_model: Any) -> torch.nn.Module:
    """The base UNet a LoRA folder adapts: ``base_model`` (a Stable-Diffusion-layout folder
    with ``unet/``, or a mapping with a "unet" module), else ``unet/`` beside the folder."""
    if isinstance(base_model, Mapping) and base_model.get("unet") is not None:
        return copy.deepcopy(base_model["unet"]).eval()
    candidates = [Path(base_model)] if isinstance(base_model, (str, Path)) else []
    candidates.append(folder.parent)
    for cand in candidates:
        for model_dir in (cand / "unet", cand):
            if (model_dir / "config.json").exists():
                return load_model(model_dir)
    raise ModelError(
        f"{folder}: a LoRA checkpoint ({LORA_WEIGHTS}) needs its base model: pass the "
        "Stable-Diffusion-layout folder it was trained from (base_model=DIR, CLI --base-model)"
    )


def load_lora_unet(folder: Path, base_model: Any = None) -> torch.nn.Module:
    """The base UNet with the folder's LoRA adapter; only adapter weights are trainable."""
    from safetensors import safe_open

    path = folder / LORA_WEIGHTS
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            meta = f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types
        raise ModelError(f"{path}: not a readable safetensors file ({exc})") from None
    others = sorted({k.split(".", 1)[0] for k in keys if not k.startswith("unet.")})
    if keys and all(k.startswith("unet.") for k in keys):
        prefix: str | None = "unet"
    elif any(k.startswith(("text_encoder.", "text_encoder_2.")) for k in keys):
        raise ModelError(
            f"{path}: holds text-encoder LoRA weights ({', '.join(others)}); gradindex takes "
            "gradients over the UNet with a frozen text encoder"
        )
    else:
        prefix = None
    model = base_unet(folder, base_model)
    if not hasattr(model, "load_lora_adapter"):
        raise ModelError(f"{type(model).__name__} cannot take LoRA adapters (diffusers too old?)")
    try:
        model.load_lora_adapter(
            str(folder), prefix=prefix, adapter_name=ADAPTER, weight_name=LORA_WEIGHTS
        )
    except ImportError:
        raise ModelError("LoRA checkpoints need peft: pip install 'gradindex[text]'") from None
    except (ValueError, RuntimeError, KeyError) as exc:
        raise ModelError(
            f"{path}: could not apply the LoRA weights to the base UNet ({str(exc).splitlines()[0]})"
        ) from None
    lora = [n for n, _ in model.named_parameters() if ".lora_" in n]
    if not lora:
        raise ModelError(f"{path}: no LoRA layer matched the base UNet; is it the right base?")
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_" in name)
    logger.info("%s: LoRA adapter on %d tensors (%s)", folder, len(lora), json.dumps(meta)[:200])
    return model.eval()


def lora_parameter_count(model: torch.nn.Module) -> int:
    """Number of LoRA adapter parameters in a model (0 without adapters)."""
    return sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
