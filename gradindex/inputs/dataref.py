"""What the user gave as ``data``, told once: ``parse_data(data)`` → a ``DataRef`` with its kind.

Every entry point that takes the user's data (``build_index``, ``add_samples``, the query
images' reader, ``open_source``) calls ``parse_data`` once and hands the ``DataRef`` on; no
other code looks at a path's suffix or splits ``file.h5:/dataset`` again, so a name is read
the same way everywhere (a folder called ``a:`` included). A ``DataRef`` passes through
``parse_data`` unchanged.

    kind      what                                  fields set
    array     numpy array, tensor, list of arrays   value
    source    an open ``DataSource``                value
    npy       file.npy                              path
    npz       file.npz                              path
    h5        file.h5:/images                       path, dataset
    image     one image file (.png, .jpg, ...)      path
    folder    a folder of image files               path
    hf        a ``save_to_disk`` folder             path
    parquet   a .parquet file, or a folder of them  path
    tar       shards-{000..009}.tar                 pattern
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gradindex.errors import DataError
from gradindex.inputs.files import IMAGE_SUFFIXES
from gradindex.inputs.sources import DataSource

KINDS = ("array", "source", "npy", "npz", "h5", "image", "folder", "hf", "parquet", "tar")
FILE_KINDS = ("npy", "npz", "h5", "image", "folder", "hf", "parquet", "tar")
WHAT_TO_GIVE = (
    "give an array, a .npy/.npz file, 'file.h5:/dataset', an image file or folder, a Hugging "
    "Face dataset folder or .parquet file, or tar shards ('shards-{000..009}.tar')"
)
_H5_SPLIT = re.compile(r"\.(?:h5|hdf5):/")


@dataclass(frozen=True)
class DataRef:
    """The user's data, parsed: its ``kind`` (one of ``KINDS``) and where it is."""

    kind: str
    given: str  # as the user wrote it (messages); the type name for in-memory data
    path: Path | None = None  # the file or folder (h5: the file)
    dataset: str | None = None  # h5: the dataset, '/images'
    pattern: str | None = None  # tar: the shard pattern as given
    value: Any = field(default=None, compare=False, repr=False)  # array / DataSource

    @property
    def location(self) -> str | None:
        """Where the data is, absolute ('file.h5:/set' keeps its dataset), or None for data in
        memory: what the manifest records for viewers (``gradindex serve``) to read again."""
        if self.kind == "h5":
            return f"{self.path.resolve()}:{self.dataset}"  # type: ignore[union-attr]
        if self.kind == "tar":
            return str(Path(self.pattern).absolute())  # type: ignore[arg-type]
        return None if self.path is None else str(self.path.resolve())

    @property
    def exists(self) -> bool:
        """The file, folder or HDF5 file is there (tar shards are checked when opened)."""
        return self.kind in ("array", "source", "tar") or bool(self.path and self.path.exists())


def parse_data(data: Any) -> DataRef:
    """Tell what ``data`` is, once. Paths are checked to exist (HDF5 datasets, tar shards and
    a file's contents are checked by whoever opens them); anything unreadable is a one-line
    ``DataError`` saying what to give instead. ``file.h5:/dataset`` splits after the first
    '.h5:' or '.hdf5:' whose file exists (a folder or dataset name may hold ':/' too)."""
    if isinstance(data, DataRef):
        return data
    if isinstance(data, DataSource):
        return DataRef("source", data.name, value=data)
    if isinstance(data, torch.Tensor):
        return DataRef("array", "tensor", value=data.detach().cpu().numpy())
    if isinstance(data, np.ndarray):
        return DataRef("array", "array", value=data)
    if isinstance(data, (list, tuple)) and data and all(isinstance(a, np.ndarray) for a in data):
        if len({a.shape for a in data}) > 1:
            raise DataError("the images in the list differ in shape; give images of one size")
        return DataRef("array", "list of arrays", value=np.stack(data))
    if not isinstance(data, (str, os.PathLike)):
        raise DataError(f"cannot read images from a {type(data).__name__}: {WHAT_TO_GIVE}")
    text = os.fspath(data)
    if text.endswith(".tar") or (".tar" in text and "{" in text):  # shards-{000..009}.tar
        return DataRef("tar", text, pattern=text)
    cuts = [m.end() - 2 for m in _H5_SPLIT.finditer(text)]  # the ':' of each '.h5:/'
    if cuts:
        cut = next((c for c in cuts if Path(text[:c]).is_file()), cuts[0])
        return DataRef("h5", text, path=Path(text[:cut]), dataset=text[cut + 1 :])
    path = Path(text)
    if not path.exists():
        raise DataError(f"{text}: no such file or folder")
    if path.is_dir():
        kind = "hf" if is_hf_folder(path) else "parquet" if has_parquet(path) else "folder"
        return DataRef(kind, text, path=path)
    suffix = path.suffix.lower()
    if suffix in (".h5", ".hdf5"):
        raise DataError(f"{text}: name the dataset, e.g. '{text}:/images'")
    kind = {".npy": "npy", ".npz": "npz", ".parquet": "parquet"}.get(suffix)
    if kind is None and suffix in IMAGE_SUFFIXES:
        kind = "image"
    if kind is None:
        raise DataError(f"{text}: unsupported file type; {WHAT_TO_GIVE}")
    return DataRef(kind, text, path=path)


def is_hf_folder(path: Path) -> bool:
    """A ``save_to_disk`` folder (a Dataset's ``state.json`` or a DatasetDict's
    ``dataset_dict.json``)."""
    return (path / "state.json").exists() or (path / "dataset_dict.json").exists()


def has_parquet(folder: Path) -> bool:
    """A folder holding parquet files: the Hub's dataset layout keeps them under
    ``data/`` (``data/train-00000-of-00001.parquet``), its parquet conversion under
    ``<config>/<split>/``. Three levels deep at most: an image folder is not walked twice."""
    patterns = ("*.parquet", "*/*.parquet", "*/*/*.parquet")
    return any(next(folder.glob(p), None) is not None for p in patterns)
