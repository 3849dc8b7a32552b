"""Training and query images: loading, validation, and mapping into the model's input range.

Holds:
- ``load_images(source)``: a numpy array, ``.npy`` / ``.npz``, an HDF5 dataset
  (``file.h5:/images``) or a folder of image files → (float32 array [N, C, H, W], ids).
- ``resolve_data_range(images)``: the value range the spec records when the user gave none.
- ``to_model_input(images, ...)``: validates (shape, channels, NaN) and maps to [-1, 1] at the
  model's sample size — the single path both build and query go through, so both agree.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from gradindex.errors import DataError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
UINT8_RANGE = (0.0, 255.0)


def load_images(source: Any) -> tuple[np.ndarray, np.ndarray]:
    """Load images from any supported source. Returns (images, ids): images as an array
    [N, C, H, W] (dtype kept: uint8 stays uint8 so its 0..255 range is known) and ids as an
    int64 row range for arrays or file names (relative to the folder) for image folders."""
    if isinstance(source, torch.Tensor):
        source = source.detach().cpu().numpy()
    if isinstance(source, np.ndarray):
        arr = source
        ids: np.ndarray | None = None
    elif isinstance(source, (str, os.PathLike)):
        arr, ids = _load_path(str(source))
    elif isinstance(source, Sequence) and source and all(isinstance(s, np.ndarray) for s in source):
        arr, ids = np.stack(source), None
    else:
        raise DataError(
            f"cannot read images from a {type(source).__name__}: give an array, a .npy/.npz file, "
            "'file.h5:/dataset' or a folder of image files"
        )
    arr = to_nchw(arr)
    if ids is None:
        ids = np.arange(len(arr), dtype=np.int64)
    return arr, ids


def _load_path(path: str) -> tuple[np.ndarray, np.ndarray | None]:
    h5_path, sep, dataset = path.partition(":/")
    if sep and h5_path.endswith((".h5", ".hdf5")):
        return _load_h5(h5_path, "/" + dataset), None
    p = Path(path)
    if not p.exists():
        raise DataError(f"{path}: no such file or folder")
    if p.is_dir():
        return _load_folder(p)
    if p.suffix == ".npy":
        return np.load(p, allow_pickle=False), None
    if p.suffix == ".npz":
        with np.load(p, allow_pickle=False) as z:
            keys = list(z.keys())
            key = "images" if "images" in keys else keys[0] if len(keys) == 1 else None
            if key is None:
                raise DataError(f"{path}: holds arrays {keys}; name the images array 'images'")
            return z[key], None
    if p.suffix in (".h5", ".hdf5"):
        raise DataError(f"{path}: name the dataset, e.g. '{path}:/images'")
    if p.suffix.lower() in IMAGE_SUFFIXES:
        return _read_image(p)[None], np.array([p.name])
    raise DataError(
        f"{path}: unsupported file type; use .npy, .npz, .h5:/dataset, or an image folder"
    )


def _load_h5(path: str, dataset: str) -> np.ndarray:
    import h5py

    if not Path(path).exists():
        raise DataError(f"{path}: no such file")
    with h5py.File(path, "r") as f:
        if dataset not in f:
            raise DataError(f"{path}: no dataset {dataset!r} (has: {', '.join(f.keys())})")
        return np.asarray(f[dataset])


def _load_folder(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    files = sorted(
        q for q in folder.rglob("*") if q.is_file() and q.suffix.lower() in IMAGE_SUFFIXES
    )
    if not files:
        raise DataError(f"{folder}: no image files ({', '.join(IMAGE_SUFFIXES)}) found")
    images = [_read_image(q) for q in files]
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise DataError(
            f"{folder}: images have different sizes {sorted(shapes)}; resize them first"
        )
    ids = np.array([str(q.relative_to(folder)) for q in files])
    return np.stack(images), ids


def _read_image(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.mode not in ("L", "RGB"):
                im = im.convert("RGB")
            return np.asarray(im, dtype=np.uint8)
    except OSError as exc:
        raise DataError(f"{path}: not a readable image ({exc})") from None


def to_nchw(arr: np.ndarray) -> np.ndarray:
    """[N, H, W] → [N, 1, H, W]; [N, H, W, C] (C ≤ 4 last) → [N, C, H, W]; [N, C, H, W] kept."""
    arr = np.asarray(arr)
    if arr.dtype == np.bool_ or not (
        np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)
    ):
        raise DataError(f"images have dtype {arr.dtype}; give uint8 or float pixel values")
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
        raise DataError("the dataset is empty: no images to index")
    return arr


def resolve_data_range(images: np.ndarray) -> tuple[float, float]:
    """The range the index records for float images: uint8 → 0..255; floats within [0, 1] →
    (0, 1); within [-1, 1] → (-1, 1); anything else must be given explicitly."""
    if images.dtype == np.uint8:
        return UINT8_RANGE
    finite = images[np.isfinite(images)] if images.size else images
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if lo >= 0.0 and hi <= 1.0:
        return (0.0, 1.0)
    if lo >= -1.0 and hi <= 1.0:
        return (-1.0, 1.0)
    raise DataError(
        f"float pixel values span [{lo:g}, {hi:g}]: give their range explicitly "
        "(data_range=(low, high), CLI --data-range LOW HIGH)"
    )


def to_model_input(
    images: np.ndarray | torch.Tensor,
    *,
    channels: int,
    size: int | tuple[int, int],
    data_range: tuple[float, float],
    resize: str = "bilinear",
) -> torch.Tensor:
    """Validate and map images to float32 [N, channels, H, W] in [-1, 1] at the model size.

    uint8 images use 0..255; float images use ``data_range`` (values outside it by more than
    1% of its width are an error: they were probably given in another range)."""
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    arr = to_nchw(images)
    if arr.shape[1] != channels:
        raise DataError(
            f"images have {arr.shape[1]} channel(s) but the model takes {channels}; "
            "convert them (e.g. to grayscale or RGB) first"
        )
    lo, hi = UINT8_RANGE if arr.dtype == np.uint8 else data_range
    x = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
    if not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x)).flatten(1).any(1).sum())
        raise DataError(f"{bad} image(s) contain NaN or infinite pixel values; fix or drop them")
    slack = 0.01 * (hi - lo)
    if x.min() < lo - slack or x.max() > hi + slack:
        raise DataError(
            f"pixel values span [{float(x.min()):g}, {float(x.max()):g}] but the index expects "
            f"[{lo:g}, {hi:g}]; rescale the images or rebuild with another data_range"
        )
    x = (x - lo) / (hi - lo) * 2.0 - 1.0
    target = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(x.shape[-2:]) != target:
        if resize == "error":
            raise DataError(
                f"images are {tuple(x.shape[-2:])} but the model takes {target}; "
                "resize them or build with resize='bilinear'"
            )
        logger.info("resizing images from %s to %s (%s)", tuple(x.shape[-2:]), target, resize)
        if resize == "bilinear":
            x = F.interpolate(x, size=target, mode="bilinear", align_corners=False, antialias=True)
        else:
            x = F.interpolate(x, size=target, mode="nearest")
    return x.contiguous()
