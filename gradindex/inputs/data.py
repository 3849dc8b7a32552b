"""Training and query images: loading, validation, and mapping into the model's input range.

Holds:
- ``load_images(source, channels)``: a numpy array, ``.npy`` / ``.npz``, an HDF5 dataset
  (``file.h5:/images``) or a folder of image files → (array [N, C, H, W], ids); image files
  are converted to the model's channels (grayscale or RGB), 16-bit ones to floats in [0, 1].
- ``read_array(path)``: one ``.npy`` / ``.npz`` array, pickled or broken files as a DataError.
- the value-range rules live in ``gradindex.inputs.ranges`` (``resolve_data_range`` and its
  helpers are re-exported here, where callers found them before).
- ``to_model_input(images, ...)``: validates (shape, channels, NaN) and maps to [-1, 1] at the
  model's sample size — the single path both build and query go through, so both agree.
"""

from __future__ import annotations

import logging
import os
import warnings
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from gradindex.errors import DataError
from gradindex.inputs.files import (
    IMAGE_SUFFIXES,
    check_npy_header,
    check_pixels,
    image_files,
    image_header,
)
from gradindex.inputs.ranges import (  # noqa: F401 - the range rules, re-exported
    UINT8_RANGE,
    check_given_range,
    range_of_bounds,
    resolve_data_range,
    value_bounds,
    within,
)

logger = logging.getLogger(__name__)

GRAY_MODES = ("1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N")
WIDE_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N")  # 16-bit grayscale (PNG, TIFF)


def load_images(
    source: Any, channels: int | None = None, fit: Callable[[np.ndarray], np.ndarray] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Load images from any supported source. Returns (images, ids): images as an array
    [N, C, H, W] (dtype kept: uint8 stays uint8 so its 0..255 range is known) and ids as an
    int64 row range for arrays or file names (relative to the folder) for image folders.

    channels: the model's (1 or 3); image files are converted to it (grayscale or RGB), since
    a file's mode (LA, 16-bit, palette) is storage, not content. Arrays are taken as given.
    fit: applied to each image of a folder before their sizes are compared (the trainer's
    resize and crop, ``inputs.prepare``), so a folder of mixed sizes reads as one size."""
    if isinstance(source, torch.Tensor):
        source = source.detach().cpu().numpy()
    if isinstance(source, np.ndarray):
        arr = source
        ids: np.ndarray | None = None
    elif isinstance(source, (str, os.PathLike)):
        arr, ids = _load_path(str(source), channels, fit)
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


def _load_path(
    path: str, channels: int | None, fit: Callable[[np.ndarray], np.ndarray] | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    h5_path, sep, dataset = path.partition(":/")
    if sep and h5_path.endswith((".h5", ".hdf5")):
        return _load_h5(h5_path, "/" + dataset), None
    p = Path(path)
    if not p.exists():
        raise DataError(f"{path}: no such file or folder")
    if p.is_dir():
        return _load_folder(p, channels, fit)
    if p.suffix in (".npy", ".npz"):
        return read_array(p, "images"), None
    if p.suffix in (".h5", ".hdf5"):
        raise DataError(f"{path}: name the dataset, e.g. '{path}:/images'")
    if p.suffix.lower() in IMAGE_SUFFIXES:
        return _read_image(p, channels or _file_channels([p]))[None], np.array([p.name])
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


def read_array(path: str | os.PathLike[str], key: str | None = None) -> np.ndarray:
    """The array of a ``.npy`` file, or of a ``.npz`` file (its ``key`` array, or its only
    one). Never unpickles: object arrays and broken files are a one-line DataError."""
    p = Path(path)
    if p.suffix != ".npz":
        with array_file_errors(p), open(p, "rb") as f:
            check_npy_header(f, os.fstat(f.fileno()).st_size, str(p))  # before allocating
            f.seek(0)
            return np.load(f, allow_pickle=False)
    with array_file_errors(p), np.load(p, allow_pickle=False) as z:
        keys = list(z.keys())
        if key not in keys and len(keys) != 1:
            raise DataError(f"{p}: holds arrays {keys}; name the array {key!r}")
        return z[key if key in keys else keys[0]]


def read_npz(path: str | os.PathLike[str], keys: Sequence[str]) -> dict[str, np.ndarray]:
    """The named arrays of an ``.npz`` file (each must be there), never unpickled."""
    p = Path(path)
    with array_file_errors(p), np.load(p, allow_pickle=False) as z:
        missing = [k for k in keys if k not in z]
        if missing:
            raise DataError(f"{p}: no array named {', '.join(missing)} (has: {', '.join(z)})")
        return {k: z[k] for k in keys}


@contextmanager
def array_file_errors(path: Path) -> Iterator[None]:
    """numpy's errors on object arrays, pickles and broken files → one-line DataError."""
    try:
        yield
    except DataError:  # already says what is wrong (a ValueError too)
        raise
    except (ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: {_array_file_problem(exc)}") from None


def _array_file_problem(exc: Exception) -> str:
    text = str(exc)
    if "allow_pickle" in text or "pickled" in text:
        return (
            "holds Python objects (an object-dtype or pickled array), which are never "
            "unpickled; save plain numbers or strings (e.g. np.stack(images).astype(np.float32))"
        )
    first = text.splitlines()[0] if text else type(exc).__name__
    return f"not a readable numpy array file ({first})"


def _load_folder(
    folder: Path, channels: int | None, fit: Callable[[np.ndarray], np.ndarray] | None
) -> tuple[np.ndarray, np.ndarray]:
    files = [folder / name for name in image_files(folder)]
    if not files:
        raise DataError(f"{folder}: no image files ({', '.join(IMAGE_SUFFIXES)}) found")
    channels = channels or _file_channels(files)
    images = [_read_image(q, channels) for q in files]
    images = [fit(im) for im in images] if fit is not None else images
    _check_same_size(folder, files, images)
    if len({im.dtype for im in images}) > 1:  # 8- and 16-bit files: all as floats in [0, 1]
        images = [im.astype(np.float32) / 255.0 if im.dtype == np.uint8 else im for im in images]
    ids = np.array([str(q.relative_to(folder)) for q in files])
    return np.stack(images), ids


def _check_same_size(folder: Path, files: list[Path], images: list[np.ndarray]) -> None:
    """Refuse a folder of mixed image sizes, naming the usual size and the files that differ."""
    sizes = [im.shape[-2:] for im in images]
    counts = Counter(sizes)
    if len(counts) == 1:
        return
    (usual, n_usual), *_ = counts.most_common(1)
    odd = [q for q, s in zip(files, sizes, strict=True) if s != usual]
    more = f" (+{len(odd) - 1} more)" if len(odd) > 1 else ""
    h, w = sizes[files.index(odd[0])]
    raise DataError(
        f"{folder}: images differ in size: {n_usual} are {usual[0]}x{usual[1]} (HxW) but "
        f"{odd[0].relative_to(folder)} is {h}x{w}{more}; resize them to one size first"
    )


def _file_channels(files: list[Path]) -> int:
    """1 when every file is grayscale (L, LA, 16-bit...), else 3 (each file's header only)."""
    for q in files:
        try:
            if image_header(q)[0] not in GRAY_MODES:
                return 3
        except OSError as exc:
            raise DataError(f"{q}: not a readable image ({exc})") from None
    return 1


def _read_image(path: Path, channels: int) -> np.ndarray:
    """One image file as [C, H, W] (see ``decode_image``)."""
    return decode_image(path, str(path), channels)


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
        raise DataError("the dataset is empty: no images to index")
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
    lo, hi = check_given_range(arr.dtype, data_range)  # uint8: 0..255 only
    x = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
    if not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x)).flatten(1).any(1).sum())
        raise DataError(f"{bad} image(s) contain NaN or infinite pixel values; fix or drop them")
    if not within(float(x.min()), float(x.max()), (lo, hi)):
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


def image_size(images: np.ndarray | torch.Tensor) -> tuple[int, int]:
    """(H, W) of images in any layout ``to_nchw`` takes."""
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    h, w = to_nchw(images).shape[-2:]
    return int(h), int(w)
