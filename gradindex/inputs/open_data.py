"""The training source for whatever the user gives as ``data``, and the conditioning it carries.

``open_source(data, channels)`` → a lazy ``DataSource`` (see ``inputs.sources``):

    numpy array / tensor            ArraySource (in memory, as given)
    file.npy                        NpySource (row ranges by file reads)
    file.npz                        ArraySource (an .npz cannot be memory-mapped: read whole)
    file.h5:/images                 H5Source (h5py slices)
    folder of image files           FolderSource (listed once, decoded per batch)
    save_to_disk folder / .parquet  HFSource (datasets / pyarrow)
    shards-{000..009}.tar           TarSource (tarfile: headers listed, members read by range)
    a DataSource                    itself

``source_conditioning`` then takes labels / captions from the source's columns or members when
the model needs them and none were given, else from ``inputs.conditioning``'s rules.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from gradindex.errors import DataError
from gradindex.inputs.conditioning import ConditioningData, load_conditioning, read_inputs
from gradindex.inputs.data import array_file_errors, load_images
from gradindex.inputs.files import IMAGE_SUFFIXES
from gradindex.inputs.hfdata import HFSource, has_parquet, is_hf_folder
from gradindex.inputs.prepare import Prepared
from gradindex.inputs.sources import ArraySource, DataSource, FolderSource, H5Source, NpySource
from gradindex.inputs.tars import TarSource, is_tar_pattern

logger = logging.getLogger(__name__)

ON_ERROR = ("raise", "skip")


def open_source(
    data: Any,
    channels: int | None = None,
    *,
    on_error: str = "raise",
    resolution: int | None = None,
    center_crop: bool = False,
    **columns: str | None,
) -> DataSource:
    """A lazy source over ``data``. on_error: 'raise' (a bad sample is a one-line DataError
    naming it) or 'skip' (every sample is decoded once up front; bad ones are left out, listed
    in ``source.skipped`` and a warning). resolution / center_crop: images of any size come
    out as the diffusers trainers prepare them (``inputs.prepare``). columns: ``image_column``,
    ``caption_column``, ``label_column``, ``id_column``, ``split`` of a Hugging Face dataset."""
    if on_error not in ON_ERROR:
        raise DataError(f"on_error={on_error!r}: use 'raise' or 'skip'")
    any_size = resolution is not None
    source = _open(data, channels, on_error == "skip", any_size, columns)
    if any_size and not isinstance(source, Prepared):
        source = Prepared(source, int(resolution), center_crop)
    if on_error == "skip":
        source = source.check(skip=True)
        _warn_skipped(source)
    return source


def _open(
    data: Any, channels: int | None, skip: bool, any_size: bool, columns: dict[str, Any]
) -> DataSource:
    if isinstance(data, DataSource):
        return data
    if isinstance(data, torch.Tensor):
        data = data.detach().cpu().numpy()
    if not isinstance(data, (str, os.PathLike)):
        arr, _ = load_images(data, channels)  # arrays and lists of arrays: already in memory
        return ArraySource(arr)
    text = str(data)
    if is_tar_pattern(text):
        return TarSource(text, channels, skip_bad=skip)
    h5_path, sep, dataset = text.partition(":/")
    if sep and h5_path.endswith((".h5", ".hdf5")):
        return H5Source(h5_path, "/" + dataset)
    path = Path(text)
    if not path.exists():
        raise DataError(f"{text}: no such file or folder")
    if path.suffix == ".parquet" or (path.is_dir() and (is_hf_folder(path) or has_parquet(path))):
        return HFSource(path, channels, **columns)
    if path.is_dir():
        return FolderSource(path, channels, skip_bad=skip, any_size=any_size)
    if path.suffix == ".npy":
        with array_file_errors(path):
            return NpySource(path)
    if path.suffix == ".npz" or path.suffix.lower() in IMAGE_SUFFIXES:
        arr, ids = load_images(path, channels)  # an .npz cannot be memory-mapped
        source = ArraySource(arr, text)
        source.ids = ids
        return source
    return ArraySource(*load_images(path, channels)[:1])  # its own one-line refusal


def open_inputs(
    data: Any,
    channels: int | None,
    kind: str,
    labels: Any = None,
    prompts: Any = None,
    required: bool = True,
    **options: Any,
) -> tuple[DataSource, ConditioningData]:
    """A lazy source over ``data`` and its rows' labels / captions (``source_conditioning``),
    each file read once: an ``.npz`` (which cannot be memory-mapped) is read whole, once, for
    its images and conditioning arrays (``conditioning.read_inputs``). options: ``open_source``'s
    (``on_error``, a dataset's column names)."""
    if isinstance(data, (str, os.PathLike)) and Path(data).suffix == ".npz":
        found = read_inputs(data, channels, kind, labels, prompts, required)
        source = ArraySource(found.images, str(data))
        source.ids = found.ids
        if options.get("resolution") is not None:
            source = Prepared(source, int(options["resolution"]), bool(options.get("center_crop")))
        return source, found.cond
    source = open_source(data, channels, **options)
    return source, source_conditioning(source, data, kind, labels, prompts, required)


def _warn_skipped(source: DataSource) -> None:
    if source.skipped:
        first = source.skipped[0][1]
        more = (
            f" (+{len(source.skipped) - 1} more, see source.skipped)"
            if len(source.skipped) > 1
            else ""
        )
        warnings.warn(
            f"{len(source.skipped)} bad sample(s) skipped, their ids left out: {first}{more}",
            stacklevel=3,
        )
        for key, why in source.skipped:
            logger.warning("skipped sample %s: %s", key, why)


def source_conditioning(
    source: DataSource,
    data: Any,
    kind: str,
    labels: Any = None,
    prompts: Any = None,
    required: bool = True,
) -> ConditioningData:
    """Labels / captions of ``source``'s rows for a model of conditioning ``kind``: given ones
    win; else a dataset's label / caption column or a tar's .cls / .txt members; else the
    rules of ``load_conditioning`` (an .npz's arrays, class sub-folders, metadata.jsonl)."""
    for what, given in (("labels", labels), ("prompts", prompts)):
        wanted = kind == ("class" if what == "labels" else "text")
        if wanted and given is None and what in source.missing:
            raise DataError(f"{source.name}: {source.missing[what]}; give every sample one")
    if kind == "class" and labels is None and source.labels is not None:
        labels = source.labels
    if kind == "text" and prompts is None and source.prompts is not None:
        prompts = source.prompts
    found = data if isinstance(data, (str, os.PathLike)) else None
    return load_conditioning(found, source.ids, len(source), kind, labels, prompts, required)
