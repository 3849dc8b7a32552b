"""Hugging Face ``datasets`` as a training source: ``save_to_disk`` folders and parquet files.

A ``save_to_disk`` folder is opened with ``datasets.load_from_disk``: its Arrow files are
memory-mapped, so a slice reads only its rows. Parquet files (``Dataset.to_parquet``, the Hub's
``refs/convert/parquet``) are read a row group at a time with ``pyarrow.parquet`` (what
``datasets`` reads them with) rather than ``load_dataset('parquet')``, which first copies the
whole set into its cache on every process.

Columns: the image (``image`` / ``img`` / ``pixel_values``, or the first ``Image`` feature), the
caption (``text`` / ``caption`` / ``prompt``), the class label (``label`` / ``labels``) and the
id (``id`` / ``key`` / ``file_name``, else the row number), each nameable explicitly.
"""

from __future__ import annotations

import importlib
import io
import re
from pathlib import Path
from typing import Any

import numpy as np

from gradindex.errors import DataError
from gradindex.inputs.dataref import is_hf_folder
from gradindex.inputs.pixels import decode_image, to_nchw
from gradindex.inputs.sources import DataSource

IMAGE_COLUMNS = ("image", "img", "pixel_values", "images")
CAPTION_COLUMNS = ("text", "caption", "prompt", "captions")
LABEL_COLUMNS = ("label", "labels", "class")
ID_COLUMNS = ("id", "key", "__key__", "file_name")


INSTALL = "Hugging Face datasets need the datasets package: pip install 'gradindex[datasets]'"


def _require(module: str) -> Any:
    """``importlib.import_module(module)``, or a one-line DataError saying what to install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise DataError(INSTALL) from None


class ArrowTable:
    """Rows of a memory-mapped Arrow table (``load_from_disk``) by range."""

    def __init__(self, path: Path, split: str | None):
        datasets = _require("datasets")
        try:
            ds = datasets.load_from_disk(str(path))
        except (FileNotFoundError, ValueError) as exc:
            raise DataError(f"{path}: not a readable saved dataset ({exc})") from None
        except IndexError:  # datasets cannot load a dataset saved with no rows (0 shards)
            raise DataError(f"{path}: the dataset is empty: no images to index") from None
        if isinstance(ds, datasets.DatasetDict):
            split = split or ("train" if "train" in ds else None)
            if split not in ds:
                raise DataError(f"{path}: holds splits {list(ds)}; name one (split=...)")
            ds = ds[split]
        self.table = ds.data  # memory-mapped: slicing reads only those rows
        self.num_rows = ds.num_rows
        self.columns = list(ds.column_names)

    def column(self, name: str, start: int, stop: int) -> list[Any]:
        return self.table.slice(start, stop - start).column(name).to_pylist()


class ParquetTable:
    """Rows of one or more parquet files by range, a row group at a time (the last kept)."""

    def __init__(self, files: list[Path]):
        pq = _require("pyarrow.parquet")
        try:
            self.files = [pq.ParquetFile(f) for f in files]
        except Exception as exc:  # pyarrow.ArrowInvalid and OSError both say 'not parquet'
            raise DataError(f"{files[0].parent}: not a readable parquet file ({exc})") from None
        self.groups: list[tuple[int, int, int]] = []  # (file, group, first row)
        first = 0
        for fi, pf in enumerate(self.files):
            for g in range(pf.num_row_groups):
                self.groups.append((fi, g, first))
                first += pf.metadata.row_group(g).num_rows
        self.num_rows = first
        self.starts = np.array([g[2] for g in self.groups] + [first], np.int64)
        self.columns = list(self.files[0].schema_arrow.names)
        self._cached: tuple[int, Any] | None = None

    def column(self, name: str, start: int, stop: int) -> list[Any]:
        out: list[Any] = []
        g = int(np.searchsorted(self.starts, start, side="right")) - 1
        while start < stop:
            fi, gi, first = self.groups[g]
            if self._cached is None or self._cached[0] != g:
                self._cached = (g, self.files[fi].read_row_group(gi))
            table = self._cached[1]
            end = min(stop, int(self.starts[g + 1]))
            out += table.slice(start - first, end - start).column(name).to_pylist()
            start, g = end, g + 1
        return out


class HFSource(DataSource):
    """A Hugging Face dataset's image column (and caption / label / id columns) as a source."""

    def __init__(
        self,
        path: str | Path,
        channels: int | None,
        image_column: str | None = None,
        caption_column: str | None = None,
        label_column: str | None = None,
        id_column: str | None = None,
        split: str | None = None,
    ):
        super().__init__()
        path = Path(path)
        self.name, self.channels = str(path), channels or 3
        self.table = ArrowTable(path, split) if is_hf_folder(path) else _parquet(path, split)
        if self.table.num_rows == 0:
            raise DataError(f"{path}: the dataset is empty: no images to index")
        self.image_column = self._column(image_column, IMAGE_COLUMNS, "image", required=True)
        first = self.table.column(self.image_column, 0, 1)[0]
        self.decodes = isinstance(first, dict)  # an Image feature's encoded files, not arrays
        ids = self._column(id_column, ID_COLUMNS, "id")
        n = self.table.num_rows
        self.ids = (
            np.arange(n, dtype=np.int64)
            if ids is None
            else np.array([str(v) for v in self.table.column(ids, 0, n)])
        )
        if len(np.unique(self.ids)) != n:
            raise DataError(f"{path}: column {ids!r} holds repeated ids; name another id_column")
        caption = self._column(caption_column, CAPTION_COLUMNS, "caption")
        if caption is not None:
            self.prompts = [str(v) for v in self.table.column(caption, 0, n)]
        label = self._column(label_column, LABEL_COLUMNS, "label")
        if label is not None:
            self.labels = np.asarray(self.table.column(label, 0, n))

    def _column(
        self, asked: str | None, defaults: tuple[str, ...], what: str, required: bool = False
    ) -> str | None:
        cols = self.table.columns
        if asked is not None and asked not in cols:
            raise DataError(f"{self.name}: no column {asked!r} (has: {', '.join(cols)})")
        found = asked or next((c for c in defaults if c in cols), None)
        if found is None and required:
            raise DataError(
                f"{self.name}: no {what} column (looked for {', '.join(defaults)}; has: "
                f"{', '.join(cols)}); name it with image_column= (CLI --image-column)"
            )
        return found

    def _read(self, start: int, stop: int) -> np.ndarray:
        values = self.table.column(self.image_column, start, stop)
        out = np.empty((stop - start, *self.shape), self.dtype)
        for j, value in enumerate(values):
            out[j] = self._fit(self._decode(value, start + j), start + j)
        return out

    def _row(self, i: int) -> np.ndarray:
        return self._decode(self.table.column(self.image_column, i, i + 1)[0], i)

    def _decode(self, value: Any, i: int) -> np.ndarray:
        """An ``Image`` feature cell ({bytes, path}) or an array cell → [C, H, W]."""
        name = f"{self.name}: sample {self.ids[i]}"
        if isinstance(value, dict) and ("bytes" in value or "path" in value):
            data = value.get("bytes")
            if data is None and value.get("path"):
                data = Path(value["path"]).read_bytes()
            if data is None:
                raise DataError(f"{name}: the image cell is empty")
            self.bytes_read += len(data)
            return decode_image(io.BytesIO(data), name, self.channels)
        if value is None:
            raise DataError(f"{name}: the image cell is empty")
        arr = np.asarray(value)
        self.bytes_read += arr.nbytes
        return to_nchw(arr[None])[0]


def _parquet(path: Path, split: str | None = None) -> ParquetTable:
    if path.is_dir():
        files = sorted(path.rglob("*.parquet"))
        if not files:
            raise DataError(f"{path}: neither a saved dataset (state.json) nor parquet files")
        return ParquetTable(_split_files(path, files, split))
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    return ParquetTable([path])


def _split_of(path: Path) -> str | None:
    """The split a Hub parquet file belongs to: ``train-00000-of-00002.parquet`` (the Hub's
    ``data/`` files) or ``train/0000.parquet`` (``refs/convert/parquet``)."""
    named = re.fullmatch(r"(\w+?)-\d+-of-\d+(-[0-9a-f]+)?", path.stem)
    if named:
        return named.group(1)
    return path.parent.name


def _split_files(root: Path, files: list[Path], split: str | None) -> list[Path]:
    """The files of one split when the folder holds several (``train`` unless ``split``
    names another), so a Hub folder's test files are not indexed as training rows."""
    splits = {f: _split_of(f) if f.parent != root or "-of-" in f.stem else None for f in files}
    names = sorted({s for s in splits.values() if s is not None})
    if split is None and (len(names) < 2 or None in splits.values()):
        return files
    want = split or ("train" if "train" in names else None)
    picked = [f for f, s in splits.items() if s == want]
    if not picked:
        raise DataError(
            f"{root}: holds parquet files of splits {names}; name one (split=..., CLI --split)"
        )
    return picked
