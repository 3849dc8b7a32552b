"""Which torch device featurizing runs on: the one asked for, or the CPU when it is missing.

A build asked to run on ``cuda`` on a machine without CUDA falls back to the CPU with a warning
instead of failing after the models are loaded: the rows are the same either way (up to float
rounding), only slower. ``auto`` picks the first GPU when there is one.
"""

from __future__ import annotations

import warnings

import torch

from gradindex.errors import SpecError


def resolve_device(device: str | torch.device) -> str:
    """'auto' / 'cpu' / 'cuda' / 'cuda:N' -> the device string featurizing will use."""
    name = str(device).strip().lower()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise SpecError(
            f"device {device!r} is not a torch device; use cpu, cuda, cuda:N or auto"
        ) from None
    if dev.type == "cpu":
        return "cpu"
    if dev.type != "cuda":
        raise SpecError(f"device {device!r} is not supported; use cpu, cuda, cuda:N or auto")
    if not torch.cuda.is_available():
        warnings.warn(
            f"device {name!r} asked for but CUDA is not available here; featurizing on the CPU",
            RuntimeWarning,
            stacklevel=3,
        )
        return "cpu"
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise SpecError(
            f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s); "
            "use cuda:0 .. cuda:N-1"
        )
    return name
