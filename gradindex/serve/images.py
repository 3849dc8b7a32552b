"""Training images by row number, and images as PNG thumbnails.

A training image is addressed by its row in the index (an integer checked against the index's
length), never by a path from a request: the file read is the build's recorded data source
(manifest ``data_source``, read with its ``data_options``) or the ``--data`` given at startup,
opened as the build opened it (``open_source``): an image folder listed in the build's order, a
dataset or tar shards by row.
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from typing import Any

import numpy as np

from gradindex.errors import DataError
from gradindex.inputs.dataref import DataRef, parse_data
from gradindex.inputs.sources import DataSource
from gradindex.inputs.training_data import open_source

THUMB_SIDE = 96  # pixels of a thumbnail's longer side (small images are scaled up, nearest)
CACHE = 2048  # thumbnails kept in memory


def _located(source: str) -> DataRef:
    """The recorded training data location, parsed as the build parsed it, or a DataError
    saying it has gone."""
    try:
        ref = parse_data(source)
    except DataError:
        ref = None
    if ref is None or not ref.exists:
        path = source if ref is None or ref.path is None else ref.path
        raise DataError(f"{path}: the training data is no longer there; use --data PATH")
    return ref


class TrainingImages:
    """Read-only access to the training images of an index: ``image(row)`` → [C, H, W]."""

    def __init__(
        self,
        source: str | None,
        num_rows: int,
        channels: int,
        data_range: Any,
        options: dict[str, Any] | None = None,
    ):
        self.source = source
        self.channels = channels
        self.options = dict(options or {})  # open_source's: a dataset's columns, on_error
        self.data_range = tuple(data_range) if data_range else None
        self.problem: str | None = None  # why no thumbnails can be shown, or None
        self._source: DataSource | None = None
        self._lock = threading.Lock()
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        try:
            found = self._open(source)
        except DataError as exc:
            self.problem = str(exc)
            return
        except OSError as exc:
            self.problem = f"{source}: cannot be read ({exc.strerror or exc}); start with --data"
            return
        if found is not None and found != num_rows:
            self.problem = (
                f"{source} holds {found} images but the index has {num_rows} rows (moved, "
                "changed, or rows added from other data); start with --data PATH"
            )

    @property
    def available(self) -> bool:
        return self.problem is None

    def _open(self, source: str | None) -> int | None:
        """Open the source as the build read it (``open_source``: the same order, ids and
        dataset columns) without decoding images; return how many images it holds."""
        if not source:
            raise DataError(
                "the index records no training data location (built from an in-memory array); "
                "start 'gradindex serve' with --data PATH to see training images"
            )
        ref = _located(source)
        self._source = open_source(ref, self.channels, **self.options)
        return len(self._source)

    def image(self, row: int) -> np.ndarray:
        """Row ``row``'s image, [C, H, W], as stored (uint8 or float)."""
        if self.problem is not None:
            raise DataError(self.problem)
        with self._lock:  # h5py files and tar handles are not safe across threads
            return self._source[row : row + 1][0]

    def thumbnail(self, row: int) -> bytes:
        """PNG bytes of row ``row``'s image, scaled to THUMB_SIDE (cached)."""
        with self._lock:
            if row in self._cache:
                self._cache.move_to_end(row)
                return self._cache[row]
        png = png_bytes(self.image(row), self.data_range, THUMB_SIDE)
        with self._lock:
            self._cache[row] = png
            while len(self._cache) > CACHE:
                self._cache.popitem(last=False)
        return png


def to_uint8(image: np.ndarray, data_range: Any = None) -> np.ndarray:
    """[C, H, W] → uint8 [H, W] or [H, W, 3] for display: uint8 as is, floats mapped from
    ``data_range`` (or their own [0, 1] / [-1, 1] range) to 0..255."""
    x = np.asarray(image)
    if x.dtype != np.uint8:
        x = x.astype(np.float32)
        lo, hi = data_range or ((-1.0, 1.0) if x.min() < 0 else (0.0, 1.0))
        x = np.clip((x - lo) / max(hi - lo, 1e-12) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    if x.shape[0] == 1:
        return x[0]
    return np.moveaxis(x[:3], 0, -1)


def png_bytes(image: np.ndarray, data_range: Any = None, side: int = THUMB_SIDE) -> bytes:
    """A [C, H, W] image as PNG bytes, its longer side scaled to ``side`` (nearest neighbour,
    so a 16 x 16 training digit stays sharp)."""
    from PIL import Image

    pil = Image.fromarray(to_uint8(image, data_range))
    scale = side / max(pil.size)
    size = (max(1, round(pil.width * scale)), max(1, round(pil.height * scale)))
    resample = Image.NEAREST if scale >= 1 else Image.LANCZOS
    buf = io.BytesIO()
    pil.resize(size, resample).save(buf, format="PNG")
    return buf.getvalue()
