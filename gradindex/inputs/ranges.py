"""Pixel value ranges: which range a set of images is in, told from its dtype and values.

Holds:
- ``resolve_data_range(images, fallback)``: one range for a whole data set (the build's rule,
  recorded in the spec): uint8 → 0..255; floats within [0, 1] → (0, 1), within [-1, 1] →
  (-1, 1) (each up to 1% over); wider floats take ``fallback`` when they lie within it.
- ``range_of_bounds(lo, hi, fallback)``: the same rule from (min, max), for sources read a batch
  at a time.
- ``query_range(images, fallback, given)``: the range of a batch of query images, decided for
  each image on its own (its dtype, its values, the index's range) and never from its
  neighbours: a batch whose images come out in different ranges is refused, naming them, since
  one answer for all of them would be wrong for some.
- ``check_given_range(dtype, given)``: an explicit range applies to float images only; uint8
  pixels are 0..255 whatever a caller says.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch

from gradindex.errors import DataError

UINT8_RANGE = (0.0, 255.0)
STANDARD_RANGES = ((0.0, 1.0), (-1.0, 1.0))  # tried in this order
RANGE_SLACK = 0.01  # values may overshoot a range by 1% of its width (resampling, rounding)
DATA_RANGE_HINT = "give their range explicitly (data_range=(low, high), CLI --data-range LOW HIGH)"


def resolve_data_range(
    images: np.ndarray | torch.Tensor, fallback: Sequence[float] | None = None
) -> tuple[float, float]:
    """The one value range of a data set, from its dtype and values (see the module's rule).
    ``fallback`` is taken only for values wider than [-1, 1] that lie within it; anything else
    is ambiguous and refused."""
    images = _as_array(images)
    if images.dtype == np.uint8:
        return UINT8_RANGE
    return range_of_bounds(*value_bounds(images), fallback)


def value_bounds(images: np.ndarray) -> tuple[float, float] | tuple[None, None]:
    """(min, max) of the finite values, (None, None) when there are none."""
    finite = images[np.isfinite(images)] if images.size else images
    return (float(finite.min()), float(finite.max())) if finite.size else (None, None)


def range_of_bounds(
    lo: float | None, hi: float | None, fallback: Sequence[float] | None = None
) -> tuple[float, float]:
    """The value range of float images whose finite values span [lo, hi] (the rule of
    ``resolve_data_range``, for sources read a batch at a time)."""
    lo, hi = (0.0, 1.0) if lo is None or hi is None else (lo, hi)
    for low, high in STANDARD_RANGES:
        if within(lo, hi, (low, high)):
            return (low, high)
    other = None if fallback is None else (float(fallback[0]), float(fallback[1]))
    if other in STANDARD_RANGES:
        other = None
    if other and hi - lo > 2.0 * (1 + RANGE_SLACK) and within(lo, hi, other):
        return other
    raise DataError(
        f"pixel values span [{lo:g}, {hi:g}], which is not [0, 1] or [-1, 1]"
        + (f" (nor clearly the index's [{other[0]:g}, {other[1]:g}])" if other else "")
        + f": {DATA_RANGE_HINT}"
    )


def within(lo: float, hi: float, bounds: Sequence[float]) -> bool:
    """[lo, hi] inside ``bounds``, up to ``RANGE_SLACK`` of its width on either side."""
    slack = RANGE_SLACK * (bounds[1] - bounds[0])
    return bounds[0] - slack <= lo and hi <= bounds[1] + slack


def check_given_range(dtype: np.dtype, given: Sequence[float]) -> tuple[float, float]:
    """An explicit range as floats; refused for uint8 images unless it is their 0..255 (an
    explicit range that is silently not applied would answer for other pixels)."""
    lo, hi = float(given[0]), float(given[1])
    if dtype == np.uint8 and (lo, hi) != UINT8_RANGE:
        raise DataError(
            f"the images are uint8 (pixels 0..255) but their range was given as [{lo:g}, {hi:g}]; "
            "a range applies to float images only: drop it, or pass the images as floats"
        )
    return lo, hi


def query_range(
    images: np.ndarray | torch.Tensor,
    fallback: Sequence[float] | None = None,
    given: Sequence[float] | None = None,
) -> tuple[float, float]:
    """The value range of a batch of query images, each decided on its own (its dtype and
    values, ``fallback`` = the index's recorded range, by ``range_of_bounds``), so an image
    answers the same alone or beside others. Images that come out in different ranges are
    refused, naming them. ``given``: the caller's range, checked by ``check_given_range``."""
    arr = _as_array(images)
    if given is not None:
        return check_given_range(arr.dtype, given)
    if arr.dtype == np.uint8:
        return UINT8_RANGE
    flat = arr.reshape(len(arr), -1) if arr.ndim else arr.reshape(1, -1)
    ranges: dict[tuple[float, float], list[int]] = {}
    for i, image in enumerate(flat):
        lo, hi = value_bounds(image)
        if lo is None:  # no finite pixel: refused as NaN when the batch is mapped
            continue
        try:
            ranges.setdefault(range_of_bounds(lo, hi, fallback), []).append(i)
        except DataError as exc:
            raise DataError(f"query image {i}: {exc}") from None
    if len(ranges) > 1:
        parts = [f"{_positions(rows)} in [{r[0]:g}, {r[1]:g}]" for r, rows in ranges.items()]
        raise DataError(
            f"the query images are in different value ranges ({'; '.join(parts)}), told from "
            "each image's own values: query them separately, or "
            + DATA_RANGE_HINT.replace("explicitly", "for all")
        )
    chosen = next(iter(ranges), (0.0, 1.0))
    _warn_if_ambiguous(chosen, fallback)
    return chosen


def _warn_if_ambiguous(chosen: tuple[float, float], fallback: Sequence[float] | None) -> None:
    """Values within [0, 1] fit [-1, 1] too: say so when the index's data was [-1, 1]."""
    if chosen == (0.0, 1.0) and fallback is not None and tuple(map(float, fallback)) == (-1, 1):
        warnings.warn(
            "the query images' values lie within [0, 1] and are read as [0, 1] (e.g. a "
            "pipeline's output), though the index's training data was in [-1, 1]; if they are "
            "on the training data's scale, pass data_range=(-1, 1) (CLI --data-range -1 1)",
            stacklevel=3,
        )


def _positions(rows: list[int]) -> str:
    shown = ", ".join(map(str, rows[:5])) + (f" (+{len(rows) - 5} more)" if len(rows) > 5 else "")
    return f"image{'s' if len(rows) > 1 else ''} {shown}"


def _as_array(images: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    return np.asarray(images)
