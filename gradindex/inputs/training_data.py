"""The training data's opener: the lazy source of the user's ``data``, and what it carries.

``open_source(data, channels)`` → a lazy ``DataSource`` (see ``inputs.sources``) for each kind of
``DataRef`` (``inputs.dataref.parse_data`` tells the kind, once):

    numpy array / tensor            ArraySource (in memory, as given)
    file.npy                        NpySource (row ranges by file reads)
    file.npz                        ArraySource (an .npz cannot be memory-mapped: read whole,
                                    once, with the labels / captions arrays a model needs)
    file.h5:/images                 H5Source (h5py slices)
    folder of image files           FolderSource (listed once, decoded per batch)
    save_to_disk folder / .parquet  HFSource (datasets / pyarrow)
    shards-{000..009}.tar           TarSource (tarfile: headers listed, members read by range)
    a DataSource                    itself

``source_conditioning`` then takes labels / captions from the source's columns or members when
the model needs them and none were given, else from ``inputs.labels``' rules.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from gradindex.errors import DataError, SpecError
from gradindex.inputs.dataref import DataRef, parse_data
from gradindex.inputs.encoders import Conditioner
from gradindex.inputs.files import read_npz_data
from gradindex.inputs.hfdata import HFSource
from gradindex.inputs.labels import (
    ConditioningData,
    load_conditioning,
    npz_columns,
    npz_conditioning,
)
from gradindex.inputs.pixels import check_finite, to_model_input, to_nchw
from gradindex.inputs.prepare import Prepared
from gradindex.inputs.query_images import load_images
from gradindex.inputs.ranges import range_of_bounds, value_bounds
from gradindex.inputs.slices import data_digest, shard_rows
from gradindex.inputs.sources import ArraySource, DataSource, FolderSource, H5Source, NpySource
from gradindex.inputs.tars import TarSource
from gradindex.spec import BuildSpec

logger = logging.getLogger(__name__)

ON_ERROR = ("raise", "skip")
CHECK_BATCH = 4096  # rows per read when checking an array's rows before writing


def open_source(
    data: Any,
    channels: int | None = None,
    *,
    on_error: str = "raise",
    resolution: int | None = None,
    center_crop: bool = False,
    carried: Sequence[str] = (),
    **columns: str | None,
) -> DataSource:
    """A lazy source over ``data``. on_error: 'raise' (a bad sample is a one-line DataError
    naming it) or 'skip' (every sample is decoded once up front; bad ones are left out, listed
    in ``source.skipped`` and a warning). resolution / center_crop: images of any size come
    out as the diffusers trainers prepare them (``inputs.prepare``). columns: ``image_column``,
    ``caption_column``, ``label_column``, ``id_column``, ``split`` of a Hugging Face dataset.
    carried: an ``.npz``'s arrays to read with its images (``labels.npz_columns``)."""
    if on_error not in ON_ERROR:
        raise DataError(f"on_error={on_error!r}: use 'raise' or 'skip'")
    ref, skip, any_size = parse_data(data), on_error == "skip", resolution is not None
    kind, path = ref.kind, ref.path
    if kind == "source":
        source = ref.value
    elif kind == "array":
        source = ArraySource(to_nchw(ref.value))  # already in memory
    elif kind == "tar":
        source = TarSource(ref.pattern, channels, skip_bad=skip)
    elif kind == "h5":
        source = H5Source(str(path), ref.dataset)
    elif kind in ("hf", "parquet"):
        source = HFSource(path, channels, **columns)
    elif kind == "folder":
        source = FolderSource(path, channels, skip_bad=skip, any_size=any_size)
    elif kind == "npy":
        source = NpySource(path)
    elif kind == "npz":  # cannot be memory-mapped: read whole, once, with its labels / captions
        arrays = read_npz_data(path, ("images", *carried))
        source = ArraySource(to_nchw(arrays["images"]), str(path))
        source.labels, source.prompts = npz_conditioning(arrays)
    else:  # one image file
        images, ids = load_images(ref, channels)
        source = ArraySource(images, str(path))
        source.ids = ids
    if any_size and not isinstance(source, Prepared):
        source = Prepared(source, int(resolution), center_crop)
    if skip:
        source = source.check(skip=True)
        _warn_skipped(source)
    return source


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
    ref: DataRef | None,
    kind: str,
    labels: Any = None,
    prompts: Any = None,
    required: bool = True,
) -> ConditioningData:
    """Labels / captions of ``source``'s rows (opened from ``ref``, ``parse_data``'s) for a
    model of conditioning ``kind``: given ones win; else what the source carries (a dataset's
    label / caption column, a tar's .cls / .txt members, an .npz's arrays); else the rules of
    ``load_conditioning`` (class sub-folders, metadata.jsonl)."""
    for what, given in (("labels", labels), ("prompts", prompts)):
        wanted = kind == ("class" if what == "labels" else "text")
        if wanted and given is None and what in source.missing:
            raise DataError(f"{source.name}: {source.missing[what]}; give every sample one")
    if kind == "class" and labels is None and source.labels is not None:
        labels = source.labels
    if kind == "text" and prompts is None and source.prompts is not None:
        prompts = source.prompts
    return load_conditioning(ref, source.ids, len(source), kind, labels, prompts, required)


@dataclass
class TrainingRows:
    """The training rows a build featurizes (its shard's), opened and checked once."""

    images: DataSource  # [N, C, H, W] as stored, read by row range
    ids: np.ndarray
    cond: ConditioningData  # their labels / captions
    prep: dict[str, Any]  # to_model_input's arguments: channels, size, data_range, resize
    shard: dict[str, Any] | None  # index, count, start, stop, total_rows, data_digest
    source: str | None = None  # the data's location, absolute (None: in memory): thumbnails
    options: dict[str, Any] | None = None  # open_source's column names / on_error, as given


def open_training(
    ref: DataRef,
    ids: Any,
    given: dict[str, Any],
    spec: BuildSpec,
    conditioner: Conditioner,
    sample_shape: tuple[int, ...],
    shard: tuple[int, int] | None,
    options: dict[str, Any],
) -> tuple[BuildSpec, TrainingRows]:
    """Open a build's training data (images read lazily; ids, labels / captions with it;
    ``given``: the ``labels`` / ``prompts`` passed), resolve its value range from the whole
    data set (every shard the same), cut a shard's rows, and check them before anything is
    written. Float arrays, ``.npy`` and HDF5 rows are all checked (one pass of reads, which
    also finds their range when none is given: ``_float_range``); uint8
    ones and decoded sources (image folders, tars, datasets) by their first row: uint8 pixels
    cannot be NaN or out of 0..255, and a decoded row is checked as it is featurized (a bad one
    stops the build there, naming it, its committed rows kept for a resume). Returns the spec
    with its data_range, and the rows."""
    channels, height, width = conditioner.image_shape(sample_shape)
    kind, labels, prompts = conditioner.kind, given.get("labels"), given.get("prompts")
    carried = npz_columns(kind, labels, prompts) if ref.kind == "npz" else ()
    trainer = {"resolution": spec.resolution, "center_crop": spec.center_crop}  # inputs.prepare
    images = open_source(ref, channels, carried=carried, **options, **trainer)
    cond_data = source_conditioning(images, ref, kind, labels, prompts)
    row_ids = _resolve_ids(ids, images.ids, len(images))  # lazy: rows read a batch at a time
    lo, hi = (0, len(images)) if shard is None else shard_rows(shard, len(images))
    whole = not images.decodes and images.dtype != np.uint8  # float arrays: every row checked
    scanned = whole and spec.data_range is None
    if spec.data_range is None:  # from the whole data set: every shard resolves the same one
        found = _float_range(images, lo, hi) if scanned else images.data_range()
        spec = spec.replace(data_range=found)
    prep = dict(
        channels=channels, size=(height, width), data_range=spec.data_range, resize=spec.resize
    )
    shard_info = None
    if shard is not None:
        shard_info = {"index": shard[0], "count": shard[1], "start": lo, "stop": hi}
        shard_info["total_rows"] = len(images)
        shard_info["data_digest"] = data_digest(images, row_ids)  # merge: same data, same order
        images, row_ids = images.rows(lo, hi), row_ids[lo:hi]  # only this shard's rows read
        cond_data = cond_data.rows(lo, hi)
    checked = len(images) if whole and not scanned else 1  # a scanned row is in its range
    for start in range(0, checked, CHECK_BATCH):
        to_model_input(images[start : min(start + CHECK_BATCH, checked)], **prep, warn=start == 0)
    if kind == "class":  # labels in the model's range
        conditioner.model_kwargs(cond_data, len(images))
    rows = TrainingRows(images, row_ids, cond_data, prep, shard_info, ref.location, options or None)
    return spec, rows


def _float_range(images: DataSource, lo: int, hi: int) -> tuple[float, float]:
    """A float array's value range, from all its rows, in one pass of reads that also refuses
    non-finite pixels in rows [lo, hi) (this build's): those rows are then within the range
    by construction, and need no second pass before anything is written."""
    low = high = None
    for start in range(0, len(images), CHECK_BATCH):
        block = images.read(start, start + CHECK_BATCH)
        check_finite(block[max(lo - start, 0) : max(hi - start, 0)])
        a, b = value_bounds(block)
        if a is not None:
            low, high = (a, b) if low is None else (min(low, a), max(high, b))
    return range_of_bounds(low, high)


def _resolve_ids(ids: Any, data_ids: np.ndarray, n: int) -> np.ndarray:
    if ids is None:
        return data_ids
    arr = np.asarray(ids)
    if arr.ndim != 1 or len(arr) != n:
        raise SpecError(
            f"ids has shape {arr.shape} but there are {n} images; give one id per image"
        )
    if len(np.unique(arr)) != n:
        raise SpecError("ids are not unique; give each training sample its own id")
    return arr if arr.dtype.kind in "iu" else arr.astype(str)
