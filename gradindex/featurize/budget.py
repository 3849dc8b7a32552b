"""How much memory featurizing takes: the featurize path and the items per gradient call that
fit a budget (``--max-memory``, or an automatic one from the machine).

Two paths compute the same rows (up to float32 summation order):

- ``full``: per-item gradients as [items, p] floats, aggregated into [B, 2, p] features, then
  projected (``gradients.GradientFeaturizer``); fastest while those buffers are small.
- ``streamed``: each layer's per-item gradients projected inside the backward hooks
  (``streamed.StreamedFeaturizer``); memory scales with activations, not items × parameters.

The automatic budget is what is resident once the models and maps are built plus
``AUTO_WORK_BYTES`` of per-item work (at most 70% of the available memory); when one sample
needs more, the whole 70% (a preference for speed, not a limit). On a CUDA device it is the
device's memory: what is allocated plus 70% of what is free, no per-item cap. ``choose_path``
takes ``streamed`` when the full path's buffers for one batch would pass ``FULL_PATH_BYTES`` or
half the budget (at batch 16, one noise draw: the demo UNet's are 0.12 GB, a 35.7M-
parameter DDPM's 6.9 GB). The build records the path in the manifest and a query repeats it.

Per-item memory (``item_bytes``): the activations autograd keeps, estimated from one no-grad
forward of one item as ``ACTIVATION_FACTOR`` × the bytes of every leaf module's output, plus
the path's per-item buffers. ``items_per_call`` divides what the budget leaves by it and
refuses, in one line, a budget too small for one sample.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch import nn

from gradindex.errors import MemoryBudgetError, SpecError

PATHS = ("auto", "full", "streamed")
# above this the full path's [items, p] and [B, 2, p] buffers cost more than they save
FULL_PATH_BYTES = 1 << 30
# memory per item against the leaf-module outputs of one forward (docs/build-speed.md gives the
# ratio seen on the CIFAR-10 DDPM UNet); 2 leaves room for the per-layer buffers and the allocator
ACTIVATION_FACTOR = 2.0
# an automatic budget: what is resident once models and maps are built plus this much per-item
# work (more items per call than that fit gain little: 1.40 vs 1.58 draws/CPU-s at 4 vs 16
# items, 35.7M parameters; 768 MiB against 1 GiB: the same CPU-seconds within 0.5%, peak RSS
# 1.61 instead of 1.83 GB), at most AUTO_SHARE of the available memory
AUTO_WORK_BYTES = 768 << 20
AUTO_SHARE = 0.7


def available_memory() -> int | None:
    """Bytes the system could give this process now (MemAvailable), None when unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def resident_bytes() -> int:
    """This process's resident set size now (0 where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def parse_memory(text: str | int | None) -> int | None:
    """'8G', '512M', '2.5GB', '1000000' (bytes) → bytes; None stays None (automatic)."""
    if text is None or (isinstance(text, int) and not isinstance(text, bool)):
        if isinstance(text, int) and text <= 0:
            raise SpecError(f"max_memory={text!r}: must be a positive number of bytes")
        return text
    units = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    s = str(text).strip().upper().removesuffix("IB").removesuffix("B")
    unit = s[-1:] if s[-1:] in units and s[-1:] != "" else ""
    try:
        value = float(s[: len(s) - len(unit)])
    except ValueError:
        value = -1.0
    if not 0 < value < 2**62:  # also NaN and inf
        raise SpecError(f"max_memory={text!r}: give a size such as 8G, 512M or a byte count")
    return int(value * units[unit])


def device_memory(device: torch.device) -> tuple[int, int] | None:
    """(allocated, free) bytes of a CUDA device, whose memory bounds featurizing there; None
    for other devices (the host's memory bounds theirs)."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return torch.cuda.memory_allocated(device), int(free)


def budget_bytes(
    max_memory: int | None, resident: int | None = None, gpu_free: int | None = None
) -> int:
    """The budget: ``max_memory`` when given, else AUTO_SHARE of the memory still available
    (8 GiB when the system does not say); with ``resident`` (what the process already holds,
    which the available memory does not include), that plus at most AUTO_WORK_BYTES of it.
    ``gpu_free``: featurizing on a CUDA device with this much free: AUTO_SHARE of it, with no
    AUTO_WORK_BYTES cap (a GPU gains from every item per call it can hold)."""
    if max_memory is not None:
        return max_memory
    if gpu_free is not None:
        share = int(AUTO_SHARE * gpu_free)
        return share if resident is None else resident + share
    avail = available_memory()
    share = int(AUTO_SHARE * avail) if avail else 8 << 30
    return share if resident is None else resident + min(share, AUTO_WORK_BYTES)


def full_path_bytes(num_params: int, batch: int, noise_draws: int) -> int:
    """The full path's gradient buffers for one batch: one timestep's [B·M, p] per-item
    gradients and the [B, 2, p] TracIn / ReTrac features, float32."""
    return 4 * num_params * (batch * noise_draws + 2 * batch)


def choose_path(
    path: str, streamable: bool, num_params: int, batch: int, noise_draws: int, budget: int
) -> str:
    """'full' or 'streamed' for ``path`` ('auto' decides by the full path's buffer size)."""
    if path not in PATHS:
        raise SpecError(f"featurize path {path!r}: must be one of {', '.join(PATHS)}")
    if path == "streamed" and not streamable:
        raise SpecError(
            "featurize path 'streamed' needs projection='sjlt' and a model the layer hooks "
            "support (each selected parameter in one Linear, Conv2d, norm or Embedding module)"
        )
    if path != "auto":
        return path
    need = full_path_bytes(num_params, batch, noise_draws)
    return "streamed" if streamable and need > min(FULL_PATH_BYTES, budget // 2) else "full"


def activation_bytes(model: nn.Module, run_one: Callable[[], object]) -> int:
    """Bytes of every leaf module's output in one no-grad forward (``run_one`` calls the model
    on one item)."""
    total = 0

    def count(module: nn.Module, args: tuple, output: object) -> None:
        nonlocal total
        if isinstance(output, torch.Tensor):
            total += output.numel() * output.element_size()

    leaves = [m for m in model.modules() if not any(True for _ in m.children())]
    handles = [m.register_forward_hook(count) for m in leaves]
    try:
        with torch.no_grad():
            run_one()
    finally:
        for h in handles:
            h.remove()
    return total


def items_per_call(
    left: int, per_item: int, group: int, budget: int, spare: int | None = None
) -> int:
    """Items one gradient call may hold in ``left`` bytes at ``per_item`` each, whole groups of
    ``group`` (one sample's M noise draws); refuses a budget without room for one group.
    ``spare``: None for a budget the user gave; for an automatic one, what it may add beyond
    its preferred per-item work when one group needs it (and a refusal then names the
    machine, not a --max-memory nobody set)."""
    automatic = spare is not None
    if automatic and left < group * per_item:
        left, budget = left + spare, budget + spare
    items = (max(left, 0) // max(per_item, 1)) // group * group
    if items < group:
        need = budget - left + group * per_item
        what = f"the model, projection and {group} item(s) of activations"
        if automatic:
            raise MemoryBudgetError(
                f"this machine cannot hold one sample: featurizing needs about {_size(need)} "
                f"({what}) and {int(AUTO_SHARE * 100)}% of the memory available gives "
                f"{_size(budget)}; free memory, lower --batch-size, or run where there is more"
            )
        raise MemoryBudgetError(
            f"max_memory={_size(budget)} cannot hold one sample: featurizing needs about "
            f"{_size(need)} ({what}); raise --max-memory to at least {_size(int(need * 1.1))}"
        )
    return items


def _size(n: int) -> str:
    return f"{n / 2**30:.2f}G" if n >= 2**30 else f"{n / 2**20:.0f}M"
