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
from typing import Any

from gradindex.errors import DataError
from gradindex.inputs.dataref import DataRef, parse_data
from gradindex.inputs.files import array_file_errors, read_npz_data
from gradindex.inputs.hfdata import HFSource
from gradindex.inputs.labels import (
    ConditioningData,
    load_conditioning,
    npz_columns,
    npz_conditioning,
)
from gradindex.inputs.pixels import to_nchw
from gradindex.inputs.prepare import Prepared
from gradindex.inputs.query_images import load_images
from gradindex.inputs.sources import ArraySource, DataSource, FolderSource, H5Source, NpySource
from gradindex.inputs.tars import TarSource

logger = logging.getLogger(__name__)

ON_ERROR = ("raise", "skip")


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
    any_size = resolution is not None
    skip = on_error == "skip"
    source = _open(parse_data(data), channels, skip, any_size, columns, tuple(carried))
    if any_size and not isinstance(source, Prepared):
        source = Prepared(source, int(resolution), center_crop)
    if on_error == "skip":
        source = source.check(skip=True)
        _warn_skipped(source)
    return source


def _open(
    ref: DataRef,
    channels: int | None,
    skip: bool,
    any_size: bool,
    columns: dict[str, Any],
    carried: tuple[str, ...],
) -> DataSource:
    """The source for each kind of ``DataRef`` (``inputs.dataref``)."""
    kind, path = ref.kind, ref.path
    if kind == "source":
        return ref.value
    if kind == "array":
        return ArraySource(to_nchw(ref.value))  # already in memory
    if kind == "tar":
        return TarSource(ref.pattern, channels, skip_bad=skip)
    if kind == "h5":
        return H5Source(str(path), ref.dataset)
    if kind in ("hf", "parquet"):
        return HFSource(path, channels, **columns)
    if kind == "folder":
        return FolderSource(path, channels, skip_bad=skip, any_size=any_size)
    if kind == "npy":
        with array_file_errors(path):
            return NpySource(path)
    if kind == "npz":  # cannot be memory-mapped: read whole, once, with its labels / captions
        arrays = read_npz_data(path, ("images", *carried))
        source = ArraySource(to_nchw(arrays["images"]), str(path))
        source.labels, source.prompts = npz_conditioning(arrays)
        return source
    images, ids = load_images(ref, channels)  # one image file
    source = ArraySource(images, str(path))
    source.ids = ids
    return source


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
    each file read once (an ``.npz`` whole, with its ``labels`` / ``captions`` arrays).
    options: ``open_source``'s (``on_error``, a dataset's column names)."""
    ref = parse_data(data)
    carried = npz_columns(kind, labels, prompts) if ref.kind == "npz" else ()
    source = open_source(ref, channels, carried=carried, **options)
    return source, source_conditioning(source, ref, kind, labels, prompts, required)


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
    ref = parse_data(data)
    columns = npz_columns(kind, labels, prompts) if ref.kind == "npz" else ()
    if columns:  # its labels / captions array (the images were read when it was opened)
        labels, prompts = npz_conditioning(read_npz_data(ref.path, columns), kind)
    return load_conditioning(
        parse_data(data), source.ids, len(source), kind, labels, prompts, required
    )
