"""What ``'auto'`` means in a BuildSpec: the featurize configuration, chosen by the model's size.

- **Small models** (one batch's per-item gradients on the full path within ``FULL_PATH_BYTES``
  at the default batch size, ``LINE_BATCH``: the demo UNet's take 0.12 GB): ``projection='sjlt'`` over the full-space gradients with exact
  norms, float32: DESIGN §1's formulas as the papers write them.
- **Large models** (a 35.7M-parameter CIFAR-10 DDPM's take 6.9 GB): any path that forms
  per-item gradients does the per-sample loop's FLOPs (the weight gradients; at 32×32 even the
  ghost-norm identity costs as much), so a build cannot beat the loop by much. Above the line:
  ``projection='kronecker-sjlt'`` with ``norms='projected'`` (each layer's inputs and output
  gradients projected separately to ``LAYER_DIM`` outputs, all of them then by sparse JL to d;
  a draw's norm is that of its layer outputs), which leaves the
  forward and the backward to the inputs, and ``precision='bfloat16'`` where the device has
  bfloat16 units (``native_bfloat16``). Models the layer hooks cannot follow, and Adam
  preconditioning (not Kronecker-factored), stay on sjlt (the streamed path, ``budget``).

The choice depends on the spec's identity and the model only (not on the memory free now, nor
on ``batch_size``, which a resumed build or a rebuilt shard may change), so the same spec gives
the same index on any machine but for the bfloat16 units; the build stores the resolved spec,
which queries repeat. docs/build-speed.md has the measurements behind the line.
"""

from __future__ import annotations

import torch
from torch import nn

from gradindex.featurize.budget import FULL_PATH_BYTES, full_path_bytes
from gradindex.featurize.persample import HookGradients
from gradindex.spec import AUTO, AUTO_FIELDS, BuildSpec

CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of bfloat16 dot products
# the batch the line is drawn at: BuildSpec's default, whatever batch_size a build runs (how much
# memory a batch takes is the featurize path's choice, budget.choose_path)
LINE_BATCH = BuildSpec().batch_size


def native_bfloat16(device: torch.device | str) -> bool:
    """True where bfloat16 matmuls run on bfloat16 units (CUDA that supports it; x86 CPUs with
    AVX512-BF16 or AMX): elsewhere autocast emulates them and gains nothing."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return any(flag in line.split() for flag in CPU_BF16_FLAGS)
    except OSError:
        pass
    return False


def large_model(spec: BuildSpec, num_params: int) -> bool:
    """Whether the full path's buffers for a batch of ``LINE_BATCH`` would pass
    ``FULL_PATH_BYTES`` (not ``spec.batch_size``: it is no part of an index's identity)."""
    need = full_path_bytes(num_params, LINE_BATCH, spec.noise_draws)
    return need > FULL_PATH_BYTES


def resolve_auto(
    spec: BuildSpec, model: nn.Module, param_names: list[str], device: torch.device | str
) -> BuildSpec:
    """``spec`` with 'auto' projection / precision decided for ``model`` (its selected
    ``param_names``) on ``device``; a spec without 'auto' comes back unchanged."""
    if all(getattr(spec, f) != AUTO for f in AUTO_FIELDS):
        return spec
    named = dict(model.named_parameters())
    num_params = sum(named[n].numel() for n in param_names)
    changes: dict[str, str] = {}
    kron = False
    if spec.projection == AUTO:
        kron = (
            large_model(spec, num_params)
            and spec.precondition == "none"
            and HookGradients.supports(model, param_names)
        )
        changes["projection"] = "kronecker-sjlt" if kron else "sjlt"
        if kron:
            changes["norms"] = "projected"
    if spec.precision == AUTO:
        fast = kron and native_bfloat16(device)
        changes["precision"] = "bfloat16" if fast else "float32"
    return spec.replace(**changes)
