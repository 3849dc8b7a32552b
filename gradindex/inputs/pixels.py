"""Pixels: one encoded image decoded, any array layout as [N, C, H, W], and the mapping into
the model's input range that build and query share.

Holds:
- ``decode_image(file, name, channels)``: one image file's pixels in the model's channels
  (grayscale or RGB), 16-bit ones as floats in [0, 1], alpha dropped.
- ``to_nchw(arr)``: [N, H, W] / [N, H, W, C] / [N, C, H, W] → [N, C, H, W], refusing what is
  ambiguous.
- ``to_model_input(images, ...)``: validates (shape, channels, NaN, value range) and maps to
  [-1, 1] at the model's sample size — the single path both build and query go through, so
  both agree. The value-range rules are ``gradindex.inputs.ranges``'.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from gradindex.errors import DataError
from gradindex.inputs.files import check_pixels
from gradindex.inputs.ranges import check_given_range, within

logger = logging.getLogger(__name__)

GRAY_MODES = ("1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N")
WIDE_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N")  # 16-bit grayscale (PNG, TIFF)


def decode_image(file: Any, name: str, channels: int) -> np.ndarray:
    """One encoded image (a path or a binary file object, ``name`` for messages) as [C, H, W],
    C = 1 (channels 1) or 3: uint8, or float32 in [0, 1] for 16-bit grayscale files (scaled
    by 65535, not clipped to 8 bits). Alpha is dropped."""
    from PIL import Image

    try:
        with warnings.catch_warnings():  # PIL's warning past its limit: refused right below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(file)
        with im:
            check_pixels(name, *im.size)  # from the header, before any pixel is decoded
            if im.mode in WIDE_MODES:
                gray = _wide_gray(name, np.asarray(im))[None]  # [1, H, W]
                return gray if channels == 1 else np.repeat(gray, 3, axis=0)
            mode = "L" if channels == 1 else "RGB" if channels == 3 else None
            if mode is None:  # other channels: keep the file's own, to_model_input refuses it
                mode = "L" if im.mode in GRAY_MODES else "RGB"
            arr = np.asarray(im.convert(mode) if im.mode != mode else im, dtype=np.uint8)
            return arr[None] if arr.ndim == 2 else np.moveaxis(arr, -1, 0)
    except Image.DecompressionBombError as exc:  # past PIL's own limit, found on opening
        raise DataError(f"{name}: {str(exc).rstrip('.')}; downscale it first") from None
    except DataError:
        raise
    except (OSError, SyntaxError, ValueError) as exc:  # PIL: broken or truncated data
        raise DataError(f"{name}: not a readable image ({exc})") from None


def _wide_gray(path: Path | str, arr: np.ndarray) -> np.ndarray:
    """16-bit grayscale pixels → float32 in [0, 1]; 32-bit integer images beyond 16 bits have
    no known range and are refused."""
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) > 65535):
        raise DataError(
            f"{path}: integer pixels span [{int(arr.min())}, {int(arr.max())}], beyond 16 bits; "
            "convert the image to 8 or 16 bits"
        )
    return arr.astype(np.float32) / 65535.0


def to_nchw(arr: np.ndarray) -> np.ndarray:
    """[N, H, W] → [N, 1, H, W]; [N, H, W, C] (C ≤ 4 last) → [N, C, H, W]; [N, C, H, W] kept."""
    arr = np.asarray(arr)
    if arr.dtype == np.bool_ or not (
        np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)
    ):
        raise DataError(f"images have dtype {arr.dtype}; give uint8 or float pixel values")
    if arr.ndim == 3 and arr.shape[-1] in (1, 3, 4) and min(arr.shape[:2]) > 4:
        raise DataError(  # one H x W x C image, or N images of width C? never guess
            f"images have shape {tuple(arr.shape)}: one image of {arr.shape[0]}x{arr.shape[1]} "
            f"with {arr.shape[2]} channel(s) or {arr.shape[0]} images {arr.shape[2]} pixels wide; "
            "give one image as x[None] ([1, H, W, C]), several as [N, H, W, C] or [N, C, H, W]"
        )
    if arr.ndim == 3:
        arr = arr[:, None]
    elif arr.ndim == 4:
        if arr.shape[-1] in (1, 3, 4) and arr.shape[1] not in (1, 3, 4):
            arr = np.moveaxis(arr, -1, 1)
    else:
        raise DataError(
            f"images have shape {tuple(arr.shape)}; expected [N, H, W], [N, H, W, C] or [N, C, H, W]"
        )
    if arr.shape[0] == 0:
        raise DataError(f"images have shape {tuple(arr.shape)}: empty, no images at all")
    return arr


def to_model_input(
    images: np.ndarray | torch.Tensor,
    *,
    channels: int,
    size: int | tuple[int, int],
    data_range: tuple[float, float],
    resize: str = "bilinear",
    warn: bool = True,
) -> torch.Tensor:
    """Validate and map images to float32 [N, channels, H, W] in [-1, 1] at the model size.

    ``data_range``: the images' range (uint8 images: 0..255, anything else refused); values
    outside it by more than 1% of its width are an error (probably given in another range). Images of
    another size are resized (``resize`` 'bilinear' or 'nearest', with a warning unless
    ``warn`` is False) or refused ('error')."""
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    arr = to_nchw(images)
    if arr.shape[1] != channels:
        raise DataError(
            f"images have {arr.shape[1]} channel(s) but the model takes {channels}; "
            "convert them (e.g. to grayscale or RGB) first"
        )
    lo, hi = check_given_range(arr.dtype, data_range)  # uint8: 0..255 only, so always within
    pixels = np.ascontiguousarray(arr, dtype=np.float32)
    if arr.dtype.kind == "f":  # in float32: a float64 beyond its range is infinite there
        check_finite(pixels)
    x = torch.from_numpy(pixels)
    if arr.dtype != np.uint8 and not within(float(x.min()), float(x.max()), (lo, hi)):
        raise DataError(
            f"pixel values span [{float(x.min()):g}, {float(x.max()):g}] but were given as "
            f"[{lo:g}, {hi:g}]; rescale the images or give their range (data_range=(low, high), "
            "CLI --data-range LOW HIGH)"
        )
    x = (x - lo) / (hi - lo) * 2.0 - 1.0
    target = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(x.shape[-2:]) != target:
        source = tuple(x.shape[-2:])
        if resize == "error":
            raise DataError(
                f"images are {source[0]}x{source[1]} but the model takes {target[0]}x{target[1]} "
                "(HxW); resize them or build with resize='bilinear'"
            )
        if warn:
            warnings.warn(
                f"images resized from {source[0]}x{source[1]} to the model's "
                f"{target[0]}x{target[1]} (HxW, {resize}); attribution is of the resized images",
                stacklevel=2,
            )
        if resize == "bilinear":
            x = F.interpolate(x, size=target, mode="bilinear", align_corners=False, antialias=True)
        else:
            x = F.interpolate(x, size=target, mode="nearest")
    return x.contiguous()


def check_finite(images: np.ndarray) -> None:
    """Refuse images [N, ...] holding NaN or infinite pixels, saying how many."""
    if images.dtype.kind != "f" or np.isfinite(images).all():
        return
    bad = int((~np.isfinite(images)).reshape(len(images), -1).any(1).sum())
    raise DataError(f"{bad} image(s) contain NaN or infinite pixel values; fix or drop them")


def image_size(images: np.ndarray | torch.Tensor) -> tuple[int, int]:
    """(H, W) of images in any layout ``to_nchw`` takes."""
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    h, w = to_nchw(images).shape[-2:]
    return int(h), int(w)
