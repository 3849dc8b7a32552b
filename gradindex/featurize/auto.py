"""What ``'auto'`` means in a BuildSpec: the featurize configuration, chosen by the model's size.

- **Small models** (the full path's per-item gradients for a batch of ``LINE_BATCH`` within
  ``FULL_PATH_BYTES``: the demo UNet's take 0.12 GB): ``projection='sjlt'`` over the full-space
  gradients with exact norms, float32: DESIGN §1's formulas as the papers write them.
- **Large models** (a 35.7M-parameter CIFAR-10 DDPM's take 6.9 GB): any path that forms
  per-item gradients does the per-sample loop's FLOPs (the weight gradients; at 32×32 even the
  ghost-norm identity costs as much), so a build cannot beat the loop by much. Above the line:
  ``projection='kronecker-sjlt'`` with ``norms='projected'`` (each layer's inputs and output
  gradients projected separately to ``LAYER_DIM`` outputs, all of them then by sparse JL to d;
  a draw's norm is that of its layer outputs), which leaves the forward and the backward to
  the inputs, and ``precision='bfloat16'`` where the device has bfloat16 units
  (``native_bfloat16``). Models the layer hooks cannot follow, and Adam preconditioning (not
  Kronecker-factored), stay on sjlt (the streamed path, ``budget``). ``norms`` given with
  ``projection='auto'`` is kept ('projected' where sjlt would be picked is refused).

The choice depends on the model and the spec's identity only (not on the batch size, which
changes how rows are computed, not what they are, nor on the memory free now), so the same spec
gives the same index on any machine but for the bfloat16 units; the build stores the resolved
spec, which queries repeat, and a resumed build keeps its own (``decide_auto``'s ``resumed``).
docs/build-speed.md has the measurements behind the line.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from gradindex.errors import SpecError
from gradindex.featurize.budget import FULL_PATH_BYTES, full_path_bytes
from gradindex.featurize.persample import HookGradients
from gradindex.spec import AUTO, AUTO_FIELDS, CHOICES, OMITTED_AT_DEFAULT, BuildSpec

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
    ``FULL_PATH_BYTES`` (the batch the build runs at does not move the line)."""
    return full_path_bytes(num_params, LINE_BATCH, spec.noise_draws) > FULL_PATH_BYTES


def decide_auto(
    spec: BuildSpec,
    model: nn.Module,
    param_names: list[str],
    device: torch.device | str,
    resumed: dict[str, Any] | None = None,
) -> tuple[BuildSpec, dict[str, Any] | None]:
    """``spec`` with its 'auto' fields decided for ``model`` (its selected ``param_names``) on
    ``device``, and the record of what was decided by which facts (the manifest's ``auto``,
    shown by ``gradindex info``); a spec without 'auto' comes back unchanged with None.
    ``resumed``: the stored spec of the build a resume finishes, whose decisions are kept (on
    another machine 'auto' may decide the precision otherwise; the rows must not mix)."""
    asked = [f for f in AUTO_FIELDS if getattr(spec, f) == AUTO]
    if not asked:
        return spec, None
    named = dict(model.named_parameters())
    num_params = sum(named[n].numel() for n in param_names)
    facts: dict[str, Any] = {
        "num_params": num_params,
        "full_path_bytes": full_path_bytes(num_params, LINE_BATCH, spec.noise_draws),
        "limit_bytes": FULL_PATH_BYTES,
        "batch_size": LINE_BATCH,
        "hooks": HookGradients.supports(model, param_names),
        "precondition": spec.precondition,
    }
    kron = spec.projection == AUTO and (
        large_model(spec, num_params) and spec.precondition == "none" and facts["hooks"]
    )
    projection = spec.projection
    if projection == AUTO:
        projection = "kronecker-sjlt" if kron else "sjlt"
        if spec.norms == "projected" and not kron:
            raise SpecError(
                f"BuildSpec.norms='projected' needs a Kronecker projection, but projection='auto' "
                f"picks sjlt for this model ({why_sjlt(facts)}): give projection="
                "'kronecker-sjlt' (--projection kronecker-sjlt) or norms='exact'"
            )
    decided = {"projection": projection}
    decided["norms"] = ("projected" if kron else "exact") if spec.norms == AUTO else spec.norms
    if spec.precision == AUTO:
        facts["device"] = str(torch.device(device))
        facts["native_bfloat16"] = native_bfloat16(device) if kron else None  # asked if it counts
        decided["precision"] = "bfloat16" if facts["native_bfloat16"] else "float32"
    decided = {f: decided[f] for f in asked}
    stored = {**OMITTED_AT_DEFAULT, **resumed} if resumed is not None else {}
    # a resume keeps its build's decisions when it asks for that build's projection ('auto'
    # or the same one); asked for another, the build's settings refuse the resume
    same = CHOICES["projection"][1:] if spec.projection == AUTO else (spec.projection,)
    resumes = stored.get("projection") in same
    kept = [f for f in asked if resumes and stored.get(f, AUTO) in CHOICES[f][1:]]
    kept = [f for f in kept if stored[f] != decided[f]]
    decided.update({f: stored[f] for f in kept})
    record = {"asked": asked, "decided": decided, **facts}
    if kept:
        record["kept"] = kept
    return spec.replace(**decided), record


def resolve_auto(
    spec: BuildSpec, model: nn.Module, param_names: list[str], device: torch.device | str
) -> BuildSpec:
    """``spec`` with 'auto' projection / norms / precision decided for ``model`` (its selected
    ``param_names``) on ``device``; a spec without 'auto' comes back unchanged."""
    return decide_auto(spec, model, param_names, device)[0]


def why_sjlt(facts: dict[str, Any]) -> str:
    """Why 'auto' keeps sparse JL over full-space gradients, from ``decide_auto``'s facts."""
    if facts["full_path_bytes"] <= facts["limit_bytes"]:
        return f"{_sizes(facts)}, within the {facts['limit_bytes'] / 2**30:g} GiB line"
    if facts["precondition"] != "none":
        return f"precondition={facts['precondition']!r} is not Kronecker-factored"
    return "the gradient hooks cannot follow every layer (e.g. BatchNorm)"


def describe_auto(record: dict[str, Any]) -> str:
    """The manifest's ``auto`` record in one line: what was decided and why."""
    decided = ", ".join(f"{k} {record['decided'][k]}" for k in AUTO_FIELDS if k in record["asked"])
    if "projection" not in record["asked"]:
        why = "a projection given: exact norms, float32"
    elif record["decided"]["projection"] == "kronecker-sjlt":
        why = f"{_sizes(record)}, over the {record['limit_bytes'] / 2**30:g} GiB line"
    else:
        why = why_sjlt(record)
    if record.get("native_bfloat16") is not None:
        units = "has" if record["native_bfloat16"] else "has no"
        why += f"; {record['device']} {units} bfloat16 units"
    if record.get("kept"):
        why += f"; {', '.join(record['kept'])} kept from the build resumed"
    return f"{decided} ({why})"


def _sizes(facts: dict[str, Any]) -> str:
    return (
        f"{facts['num_params']:,} parameters x batch {facts['batch_size']}: "
        f"{facts['full_path_bytes'] / 2**30:.2g} GiB of per-item gradients per batch"
    )
