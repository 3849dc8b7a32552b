"""Query images: read whole, with their names and the labels / captions they carry.

Holds ``load_images`` (an array, ``.npy`` / ``.npz``, ``file.h5:/dataset``, an image file or a
folder of them → [N, C, H, W] and ids, as ``gradindex query`` and ``gradindex serve``'s uploads
read them), ``read_inputs`` / ``query_inputs`` (the images with the labels / captions they carry,
an ``.npz`` opened once for all of them) and the ``--labels`` / ``--prompts`` files
(``read_labels_file``, ``read_prompts_file``). The user's ``data`` is told apart once, by
``inputs.dataref.parse_data``; training data is read lazily instead (``inputs.training_data``).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gradindex.errors import DataError
from gradindex.inputs.dataref import parse_data
from gradindex.inputs.files import (
    IMAGE_SUFFIXES,
    image_files,
    image_header,
    read_array,
    read_npz_data,
)
from gradindex.inputs.labels import (
    ConditioningData,
    load_conditioning,
    npz_columns,
    npz_conditioning,
)
from gradindex.inputs.pixels import GRAY_MODES, decode_image, to_nchw


def load_images(
    source: Any, channels: int | None = None, fit: Callable[[np.ndarray], np.ndarray] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Load images from an array, ``.npy`` / ``.npz``, ``file.h5:/dataset``, an image file or a
    folder of them (``source``: anything ``dataref.parse_data`` takes, or its ``DataRef``).
    Returns (images, ids): images as an array [N, C, H, W] (dtype kept: uint8 stays uint8 so
    its 0..255 range is known) and ids as an int64 row range for arrays or file names
    (relative to the folder) for image folders.

    channels: the model's (1 or 3); image files are converted to it (grayscale or RGB), since
    a file's mode (LA, 16-bit, palette) is storage, not content. Arrays are taken as given.
    fit: applied to each image of a folder before their sizes are compared (the trainer's
    resize and crop, ``inputs.prepare``), so a folder of mixed sizes reads as one size."""
    ref = parse_data(source)
    ids: np.ndarray | None = None
    if ref.kind == "array":
        arr = ref.value
    elif ref.kind == "h5":
        arr = _load_h5(str(ref.path), ref.dataset)
    elif ref.kind == "folder":
        arr, ids = _load_folder(ref.path, channels, fit)
    elif ref.kind in ("npy", "npz"):
        arr = read_npz_data(ref.path)["images"] if ref.kind == "npz" else read_array(ref.path)
    elif ref.kind == "image":
        p = ref.path
        arr, ids = _read_image(p, channels or _file_channels([p]))[None], np.array([p.name])
    else:
        raise DataError(
            f"{ref.given}: {ref.kind} data is read as training data, not here; give an array, "
            "a .npy/.npz file, 'file.h5:/dataset', an image file or a folder of image files"
        )
    arr = to_nchw(arr)
    if ids is None:
        ids = np.arange(len(arr), dtype=np.int64)
    return arr, ids


def _load_h5(path: str, dataset: str) -> np.ndarray:
    import h5py

    if not Path(path).exists():
        raise DataError(f"{path}: no such file")
    with h5py.File(path, "r") as f:
        if dataset not in f:
            raise DataError(f"{path}: no dataset {dataset!r} (has: {', '.join(f.keys())})")
        return np.asarray(f[dataset])


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


@dataclass
class Inputs:
    """Images with their ids and labels / captions, read from one data source."""

    images: np.ndarray  # [N, C, H, W], dtype as stored
    ids: np.ndarray  # row numbers, or file names relative to an image folder
    cond: ConditioningData


def read_inputs(
    source: Any,
    channels: int | None,
    kind: str,
    labels: Any = None,
    prompts: Any = None,
    required: bool = True,
    fit: Any = None,
) -> Inputs:
    """The images of ``source`` (``load_images``) and the labels / captions a model of
    conditioning ``kind`` needs (``load_conditioning``), reading the source once: an ``.npz``
    is opened once for its images, labels and captions."""
    ref = parse_data(source)
    if ref.kind == "npz":  # opened once: the labels / captions read with the images
        columns = npz_columns(kind, labels, prompts)
        arrays = read_npz_data(ref.path, ("images", *columns))
        images, ids = load_images(arrays["images"], channels)
        if columns:
            labels, prompts = npz_conditioning(arrays)
    else:
        images, ids = load_images(ref, channels, fit)
    cond = load_conditioning(ref, ids, len(images), kind, labels, prompts, required)
    return Inputs(images, ids, cond)


def query_inputs(
    source: Any,
    channels: int | None,
    kind: str,
    labels: Any = None,
    prompts: Any = None,
    fit: Any = None,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Query images, their names and the ``labels`` / ``prompts`` arguments of
    ``AttributionIndex.embed``: the given ones, else what ``source`` carries (as a build reads
    its data), else none (``embed`` then says what to pass). Labels from class sub-folders come
    as the sub-folder names: a query folder may hold only some classes, so its own numbering
    is not the index's, which ``embed`` maps the names to. fit: each image of a folder
    prepared as the index's training images were (``inputs.prepare``)."""
    given = labels is not None or prompts is not None
    found = read_inputs(source, channels, "none" if given else kind, required=False, fit=fit)
    cond = {"labels": labels, "prompts": prompts}
    if not given and kind != "none":
        cond = {"labels": found.cond.labels, "prompts": found.cond.prompts}
        if found.cond.class_names is not None:  # sub-folder names → the index's class numbers
            cond["labels"] = [found.cond.class_names[i] for i in found.cond.labels]
    return found.images, found.ids, cond


def read_labels_file(path: str | os.PathLike[str]) -> Any:
    """Class labels from a file: a ``.npy`` array, or text with one label per line (integers,
    or class names of an index built from class sub-folders)."""
    if str(path).endswith(".npy"):
        return read_array(path)
    lines = [ln.strip() for ln in Path(path).read_text().splitlines() if ln.strip()]
    return [int(ln) if ln.lstrip("-").isdigit() else ln for ln in lines]


def read_prompts_file(path: str | os.PathLike[str]) -> list[str]:
    """Prompts from a text file, one per line (blank lines skipped, the rest kept as written)."""
    return [ln for ln in Path(path).read_text().splitlines() if ln.strip()]
