"""BuildSpec's field checks that need no choice list: timesteps, image preparation, loss
weighting, the row width FAISS takes (``row_dim``). ``gradindex.spec`` calls them from
``BuildSpec._validate``; each takes the spec and ``bad(field, why)``, which makes the one-line
SpecError, and normalises numbers in place."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from gradindex.errors import SpecError

Bad = Callable[[str, str], SpecError]
MAX_ROW_DIM = 1 << 20
"""The most columns a stored row may have: FAISS (1.15) reads no index of more dimensions
(index_read.cpp: d < 2^20 + 1) though it writes one, so a wider index would be built in full,
then fail to open."""


def is_number(x: Any) -> bool:
    return (is_int(x) or isinstance(x, (float, np.floating))) and bool(np.isfinite(x))


def is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def check_timesteps(spec: Any, bad: Bad) -> None:
    """A positive count, or a non-empty list of non-negative integers (made a tuple of ints)."""
    if is_int(spec.timesteps):
        if spec.timesteps <= 0:
            raise bad("timesteps", "a count must be a positive integer")
    elif isinstance(spec.timesteps, tuple):
        if not spec.timesteps or not all(is_int(t) and t >= 0 for t in spec.timesteps):
            raise bad("timesteps", "an explicit list must hold non-negative integers")
        object.__setattr__(spec, "timesteps", tuple(int(t) for t in spec.timesteps))
    else:
        raise bad("timesteps", "must be a count or a list of integers")


def check_train_range(spec: Any, bad: Bad) -> None:
    """The timesteps against the scheduler's training range T, once it is known."""
    if spec.num_train_timesteps is not None:
        if not is_int(spec.num_train_timesteps) or spec.num_train_timesteps <= 0:
            raise bad("num_train_timesteps", "must be a positive integer")
        if isinstance(spec.timesteps, tuple) and max(spec.timesteps) >= spec.num_train_timesteps:
            raise bad("timesteps", f"must lie in [0, {spec.num_train_timesteps - 1}]")
        if is_int(spec.timesteps) and spec.timesteps > spec.num_train_timesteps:
            raise bad(
                "timesteps", f"count exceeds the {spec.num_train_timesteps} training timesteps"
            )


def check_images(spec: Any, bad: Bad) -> None:
    """How images are prepared: a (low, high) value range, the trainer's resolution / crop."""
    if spec.data_range is not None:
        r = spec.data_range
        if len(r) != 2 or not all(np.isfinite(v) for v in r) or not r[0] < r[1]:
            raise bad("data_range", "must be two finite numbers (low, high) with low < high")
        object.__setattr__(spec, "data_range", (float(r[0]), float(r[1])))
    if spec.resolution is not None and (not is_int(spec.resolution) or spec.resolution <= 0):
        raise bad("resolution", "must be a positive integer (the trainer's --resolution)")
    if not isinstance(spec.center_crop, bool):
        raise bad("center_crop", "must be true or false")
    if spec.center_crop and spec.resolution is None:
        raise bad("center_crop", "needs resolution (the size the trainer cropped to)")


def check_loss_weighting(spec: Any, bad: Bad) -> None:
    """The run's loss weighting and noise options (min-SNR needs its gamma)."""
    if spec.snr_weighting == "min_snr":
        if not is_number(spec.snr_gamma) or not spec.snr_gamma > 0:
            raise bad("snr_gamma", "snr_weighting='min_snr' needs a positive finite gamma")
        object.__setattr__(spec, "snr_gamma", float(spec.snr_gamma))
    elif spec.snr_gamma is not None:
        raise bad("snr_gamma", "is the gamma of snr_weighting='min_snr'; set that too")
    for name in ("noise_offset", "input_perturbation"):
        value = getattr(spec, name)
        if not is_number(value) or value < 0:
            raise bad(name, "must be a finite number >= 0 (0: off)")
        object.__setattr__(spec, name, float(value))


def row_dim(projection: str, proj_dim: int, num_params: int, num_checkpoints: int) -> int:
    """D, the columns of a stored row (d per checkpoint, all ``num_params`` gradient
    coordinates for 'identity'; at most d for 'kronecker'), refused above MAX_ROW_DIM."""
    per = num_params if projection == "identity" else proj_dim
    dim = per * num_checkpoints
    if dim > MAX_ROW_DIM:
        fix = (
            "use a random projection (e.g. projection='sjlt', proj_dim=4096)"
            if projection == "identity"
            else f"lower proj_dim to at most {MAX_ROW_DIM // num_checkpoints}"
        )
        raise SpecError(
            f"rows would have {num_checkpoints} checkpoint(s) x {per:,} = {dim:,} columns "
            f"({projection!r} projection), more than the {MAX_ROW_DIM:,} a FAISS index "
            f"can hold; {fix}, or select fewer parameters (params)"
        )
    return dim
