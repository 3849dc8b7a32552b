"""Training data read lazily, in order, by row range: no process holds the whole data set.

Holds ``DataSource`` (``len``, ``ids``, ``read(start, stop)`` → [B, C, H, W] in the data's own
dtype, ``rows(lo, hi)`` → a view of a shard's rows, ``data_range()``) and the array, HDF5 and
image-folder sources; Hugging Face ``datasets`` and WebDataset tars are in ``inputs.hfdata``
and ``inputs.tars``, the choice of source in ``inputs.training_data``. ``prefetch`` reads the next
batches in a background thread so decoding overlaps featurizing. Every source counts the
bytes it read (``bytes_read``): a shard job reads its own rows only.
"""

from __future__ import annotations

import contextlib
import io
import os
import queue
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from gradindex.errors import DataError
from gradindex.inputs.files import IMAGE_SUFFIXES, array_file_errors, image_files, image_header
from gradindex.inputs.pixels import GRAY_MODES, WIDE_MODES, decode_image, to_nchw
from gradindex.inputs.ranges import UINT8_RANGE, range_of_bounds, value_bounds

RANGE_BATCH = 4096  # rows per read when scanning a float source for its value range


class DataSource:
    """Rows of a training set, read a range at a time. Subclasses set ``ids`` and either
    ``_read`` (block formats) or ``_row`` (one encoded sample at a time)."""

    name: str = "data"
    ids: np.ndarray
    labels: np.ndarray | None = None  # carried by the data (a column, .cls members)
    prompts: list[str] | None = None  # captions carried by the data (a column, .txt members)
    skipped: list[tuple[str, str]]  # (id, why) of samples left out (on_error="skip")
    decodes: bool = False
    """Rows are decoded from encoded files (images in a folder, tar members, a dataset's image
    column): a read costs a decode, and a bad sample shows only when its row is read."""

    def __init__(self) -> None:
        self.bytes_read = 0
        self.skipped = []
        self.missing: dict[str, str] = {}  # "labels" / "prompts" -> the first sample lacking them
        self._shape: tuple[int, int, int] | None = None
        self._dtype: np.dtype | None = None

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of every row (from the first one)."""
        if self._shape is None:
            self._probe()
        return self._shape  # type: ignore[return-value]

    @property
    def dtype(self) -> np.dtype:
        if self._dtype is None:
            self._probe()
        return self._dtype  # type: ignore[return-value]

    def _probe(self) -> None:
        first = self._row(0)
        self._shape, self._dtype = tuple(first.shape), first.dtype  # type: ignore[assignment]

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) as [B, C, H, W] (uint8, or float32/as stored)."""
        start, stop = max(0, int(start)), min(len(self), int(stop))
        if stop <= start:
            return np.empty((0, *self.shape), self.dtype)
        return self._read(start, stop)

    def _read(self, start: int, stop: int) -> np.ndarray:
        out = np.empty((stop - start, *self.shape), self.dtype)
        for j, i in enumerate(range(start, stop)):
            out[j] = self._fit(self._row(i), i)
        return out

    def _row(self, i: int) -> np.ndarray:  # pragma: no cover - every per-row source has one
        raise NotImplementedError

    def decoded(self, i: int) -> np.ndarray:
        """Row ``i`` as stored or decoded, [C, H, W] of its own size (``inputs.prepare``)."""
        return self._row(i) if self.decodes else self.read(i, i + 1)[0]

    def _fit(self, row: np.ndarray, i: int) -> np.ndarray:
        """A decoded row in the source's shape and dtype, or a DataError naming the sample."""
        if tuple(row.shape) != self.shape:
            c, h, w = self.shape
            raise DataError(
                f"{self.name}: sample {self.ids[i]} is {row.shape[-2]}x{row.shape[-1]} (HxW) "
                f"with {row.shape[0]} channel(s) but the first is {h}x{w} with {c}; resize "
                "them to one size first"
            )
        if row.dtype == self.dtype:
            return row
        if row.dtype == np.uint8 and self.dtype == np.float32:  # beside 16-bit ones
            return row.astype(np.float32) / 255.0
        raise DataError(
            f"{self.name}: sample {self.ids[i]} holds {row.dtype} pixels but the first holds "
            f"{self.dtype}; convert the images to one bit depth"
        )

    def __getitem__(self, index: Any) -> np.ndarray:
        """``source[a:b]`` reads a range; ``source[rows]`` (integer array) gathers rows."""
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                raise IndexError("sources are read in order: use a step of 1")
            return self.read(start, stop)
        rows = np.asarray(index, dtype=np.int64)
        if rows.ndim != 1:
            raise IndexError("give a slice or a 1-D array of row numbers")
        out = np.empty((len(rows), *self.shape), self.dtype)
        for j, i in enumerate(rows):
            out[j] = self.read(int(i), int(i) + 1)[0]
        return out

    def rows(self, start: int, stop: int) -> DataSource:
        """A view of rows [start, stop): what one shard or rank reads."""
        return RowView(self, start, stop)

    def data_range(self) -> tuple[float, float]:
        """The value range (``data.resolve_data_range``'s rule): uint8, and decoded files (their
        16-bit pixels come scaled into [0, 1]), without reading; floats from their min / max."""
        if self.dtype == np.uint8:
            return UINT8_RANGE
        if self.decodes:  # every shard and process agrees without decoding the data set
            return (0.0, 1.0)
        lo = hi = None
        for start in range(0, len(self), RANGE_BATCH):
            a, b = value_bounds(self.read(start, start + RANGE_BATCH))
            if a is not None:
                lo, hi = (a, b) if lo is None else (min(lo, a), max(hi, b))
        return range_of_bounds(lo, hi)

    def check(self, skip: bool, batch: int = 256) -> DataSource:
        """Decode every row once. A bad sample raises a one-line DataError naming it; with
        ``skip`` it is left out instead (listed in ``skipped``) and a view of the good rows is
        returned, so no id ever shifts onto another sample's row."""
        bad: list[tuple[str, str]] = []
        for start in range(0, len(self), batch):
            try:
                self.read(start, start + batch)
            except DataError:
                if not skip:
                    raise
                bad += self._bad_rows(start, min(start + batch, len(self)))
        if not bad:
            return self
        lost = {b[0] for b in bad}
        keep = np.array([i for i, k in enumerate(self.ids) if str(k) not in lost], np.int64)
        view = Picked(self, keep)
        view.skipped = [*self.skipped, *bad]  # those left out at listing too
        return view

    def _bad_rows(self, start: int, stop: int) -> list[tuple[str, str]]:
        bad = []
        for i in range(start, stop):
            try:
                self.read(i, i + 1)
            except DataError as exc:
                bad.append((str(self.ids[i]), str(exc)))
        return bad


class RowView(DataSource):
    """Rows [lo, hi) of another source."""

    def __init__(self, base: DataSource, lo: int, hi: int):
        super().__init__()
        self.base, self.lo = base, int(lo)
        self.name, self.missing, self.decodes = base.name, base.missing, base.decodes
        self.ids = base.ids[lo:hi]
        self.labels = None if base.labels is None else base.labels[lo:hi]
        self.prompts = None if base.prompts is None else base.prompts[lo:hi]
        self._shape, self._dtype = base.shape, base.dtype

    def _read(self, start: int, stop: int) -> np.ndarray:
        before = self.base.bytes_read
        out = self.base.read(self.lo + start, self.lo + stop)
        self.bytes_read += self.base.bytes_read - before
        return out


class Picked(DataSource):
    """The listed rows of another source (the good ones after ``check(skip=True)``)."""

    def __init__(self, base: DataSource, keep: np.ndarray):
        super().__init__()
        self.base, self.keep = base, keep
        self.name, self.missing, self.decodes = base.name, base.missing, base.decodes
        self.ids = base.ids[keep]
        self.labels = None if base.labels is None else base.labels[keep]
        self.prompts = None if base.prompts is None else [base.prompts[i] for i in keep]
        self._shape, self._dtype = base.shape, base.dtype

    def _read(self, start: int, stop: int) -> np.ndarray:
        before = self.base.bytes_read
        out = np.stack([self.base.read(int(i), int(i) + 1)[0] for i in self.keep[start:stop]])
        self.bytes_read += self.base.bytes_read - before
        return out


class ArraySource(DataSource):
    """An in-memory or memory-mapped array [N, ...] (``.npy`` opened with ``mmap_mode='r'``):
    a read touches only its rows' pages."""

    def __init__(self, array: np.ndarray, name: str = "array"):
        super().__init__()
        self.array, self.name = array, name
        self.ids = np.arange(len(array), dtype=np.int64)
        self._shape = tuple(to_nchw(array[:1]).shape[1:])  # type: ignore[assignment]
        self._dtype = array.dtype

    def _read(self, start: int, stop: int) -> np.ndarray:
        block = np.array(self.array[start:stop])  # a copy: the mapped pages are not kept
        self.bytes_read += block.nbytes
        return to_nchw(block)


class NpySource(DataSource):
    """A ``.npy`` file read by row range with plain file reads (``np.load(mmap_mode='r')``
    only for its header and shape): unlike a memory map, the pages read do not stay in the
    process's resident memory, so a pass over a file larger than RAM keeps RSS flat."""

    def __init__(self, path: Path):
        super().__init__()
        self.path, self.name = path, str(path)
        with array_file_errors(path):  # pickled or broken: one line
            mapped = np.load(path, mmap_mode="r", allow_pickle=False)
        self.offset, self.fortran = int(mapped.offset), bool(mapped.flags.f_contiguous)
        self.fortran &= mapped.ndim > 1 and not mapped.flags.c_contiguous
        self.mapped = mapped if self.fortran else None  # column-major: read through the map
        self.row_shape, self._dtype = tuple(mapped.shape[1:]), mapped.dtype
        self.ids = np.arange(len(mapped), dtype=np.int64)
        self._shape = tuple(to_nchw(np.asarray(mapped[:1])).shape[1:])  # type: ignore[assignment]
        self.row_items = int(np.prod(self.row_shape, dtype=np.int64))
        del mapped

    def _read(self, start: int, stop: int) -> np.ndarray:
        if self.mapped is not None:
            block = np.array(self.mapped[start:stop])
        else:
            with open(self.path, "rb") as f:
                f.seek(self.offset + start * self.row_items * self.dtype.itemsize)
                count = (stop - start) * self.row_items
                block = np.fromfile(f, self.dtype, count).reshape(stop - start, *self.row_shape)
        self.bytes_read += block.nbytes
        return to_nchw(block)


class H5Source(DataSource):
    """An HDF5 dataset ``file.h5:/images``, sliced by h5py (only the rows asked are read)."""

    def __init__(self, path: str, dataset: str):
        import h5py

        super().__init__()
        if not Path(path).exists():
            raise DataError(f"{path}: no such file")
        self.file = h5py.File(path, "r")
        if dataset not in self.file:
            raise DataError(f"{path}: no dataset {dataset!r} (has: {', '.join(self.file.keys())})")
        self.data, self.name = self.file[dataset], f"{path}:{dataset}"
        if self.data.ndim not in (3, 4) or self.data.shape[0] == 0:
            to_nchw(np.empty(self.data.shape, self.data.dtype))  # the array rule's message
        self.ids = np.arange(self.data.shape[0], dtype=np.int64)
        self._shape = tuple(to_nchw(self.data[:1]).shape[1:])  # type: ignore[assignment]
        self._dtype = self.data.dtype

    def _read(self, start: int, stop: int) -> np.ndarray:
        block = self.data[start:stop]
        self.bytes_read += block.nbytes
        return to_nchw(block)


class FolderSource(DataSource):
    """A folder of image files: listed once (sorted relative paths are the ids), each file's
    header checked (channels, bit depth, size), pixels decoded only when its batch is read."""

    decodes = True

    def __init__(self, folder: Path, channels: int | None, skip_bad=False, any_size=False):
        super().__init__()
        self.folder, self.name = folder, str(folder)
        files = image_files(folder)
        if not files:
            raise DataError(f"{folder}: no image files ({', '.join(IMAGE_SUFFIXES)}) found")
        self.ids = np.array(files)
        skipped = self.skipped if skip_bad else None
        scan = _scan_headers(folder, self.ids, channels, skipped, any_size)
        self.channels, wide, size = scan
        if self.skipped:
            lost = {k for k, _ in self.skipped}
            self.ids = np.array([f for f in files if f not in lost])
        self._shape = (self.channels, *size)  # type: ignore[assignment]
        self._dtype = np.dtype(np.float32 if wide else np.uint8)

    def _row(self, i: int) -> np.ndarray:
        path = self.folder / str(self.ids[i])
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise DataError(f"{path}: not readable ({exc.strerror or exc})") from None
        self.bytes_read += len(data)
        return decode_image(io.BytesIO(data), str(path), self.channels)


def _scan_headers(
    folder: Path, names: np.ndarray, channels: int | None, skipped: list | None, any_size: bool
) -> tuple[int, bool, tuple[int, int]]:
    """(channels, any 16-bit file, the usual H x W) from each file's header: 1 channel when
    all are grayscale; mixed sizes refused (unless ``any_size``) naming an odd file."""
    gray, wide, sizes = True, False, Counter()
    odd: dict[tuple[int, int], str] = {}
    for name in names:
        try:
            mode, hw = image_header(os.path.join(folder, str(name)))
            gray &= mode in GRAY_MODES
            wide |= mode in WIDE_MODES
        except OSError as exc:
            why = f"{folder / str(name)}: not a readable image ({exc})"
            if skipped is None:
                raise DataError(why) from None
            skipped.append((str(name), why))  # with skip: left out, listed
            continue
        sizes[hw] += 1
        odd.setdefault(hw, str(name))
    if len(sizes) > 1 and not any_size:
        (usual, n_usual), (other, n_other) = sizes.most_common(2)
        more = f" (+{len(names) - n_usual - 1} more)" if len(names) - n_usual > 1 else ""
        raise DataError(
            f"{folder}: images differ in size: {n_usual} are {usual[0]}x{usual[1]} (HxW) but "
            f"{odd[other]} is {other[0]}x{other[1]}{more}; resize them to one size first"
        )
    return channels or (1 if gray else 3), wide, sizes.most_common(1)[0][0]


def prefetch(
    source: DataSource,
    spans: Iterable[tuple[int, int]],
    depth: int = 2,
    timing: dict[str, float] | None = None,
) -> Iterator[tuple[int, int, np.ndarray]]:
    """(start, stop, rows) for each span, read ``depth`` spans ahead in a background thread:
    the next batch decodes while this one is featurized; each span, checked once, is read by
    the source's own ``_read``. A read error is raised here. ``timing``
    gets ``reading_s`` (seconds in ``source.read``) and ``waiting_s`` (seconds the consumer
    waited for a batch: near 0 when decoding keeps up)."""
    box: queue.Queue = queue.Queue(maxsize=depth)
    stop_flag = threading.Event()
    clock = {"reading_s": 0.0, "waiting_s": 0.0}

    def reader() -> None:
        try:
            for a, b in spans:
                if stop_flag.is_set():
                    return
                if not 0 <= a < b <= len(source):
                    raise IndexError(f"rows [{a}, {b}) are not rows of {source.name}")
                t0 = time.perf_counter()
                rows = source._read(a, b)  # a checked span: no clamping
                clock["reading_s"] += time.perf_counter() - t0
                box.put((a, b, rows))
        except BaseException as exc:  # handed to the consumer, raised there
            box.put(exc)
            return
        box.put(None)

    thread = threading.Thread(target=reader, name="gradindex-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            t0 = time.perf_counter()
            item = box.get()
            clock["waiting_s"] += time.perf_counter() - t0
            if item is None:
                break
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop_flag.set()
        while thread.is_alive():  # unblock a reader waiting on a full queue
            with contextlib.suppress(queue.Empty):
                box.get(timeout=0.05)
        if timing is not None:
            timing.update({k: round(v, 3) for k, v in clock.items()})
