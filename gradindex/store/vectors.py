"""HDF5 vector store: row-chunked datasets written as batches finish.

Holds ``VectorStore`` over one ``vectors.h5`` file:

    ids       [N]            int64 or UTF-8 strings — training-sample ids, row-aligned
    tracin    [N, D]         stored dtype (float32/float16) — concat_c √w_c P_c a_c
    retrac    [N, D]         stored dtype — concat_c √w_c P_c r_c / ‖P_c r_c‖
    norms     [N, C, K·M]    float32 — per-draw full-space gradient norms
    done      [N]            uint8 — 1 once the row is written and flushed (resume record)
    flagged   [N]            uint8 — 1 if the row's gradient was non-finite or zero
    labels    [N]            int64 — class labels (class-conditional models only)
    prompts   [N]            UTF-8 strings — captions (text-conditional models only)
    latents   [N, c, h, w]   float32 — the scaled VAE latents the rows were computed on
                             (latent models only)

Row datasets are contiguous and allocated up front (see ``_preallocated``): a build killed at
any instant leaves a readable file whose ``done`` mask tells which rows are committed.
File attributes carry the spec JSON, the format version and a random ``build_id`` (also in the
manifest), so the file alone can be read with plain h5py by someone who never installed
gradindex, and a ``vectors.h5`` of another build is refused on open (``check_manifest``).

Also holds ``ChunkedRows``: one method's rows (or any [N, D] array-like) read as float32 a chunk
at a time or gathered by row number, for indexes built without the matrix in memory
(:mod:`gradindex.search.ondisk`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from gradindex.errors import IndexStateError, SearchError, SpecError
from gradindex.spec import METHODS, BuildSpec
from gradindex.store.layout import new_build_id

CHUNK_BYTES = 64 << 20
"""Rows read per chunk by ``ChunkedRows``: 64 MiB of float32 (>= 1024 rows)."""


def _preallocated(
    f: h5py.File, name: str, shape: tuple[int, ...], dtype: str, zero_fill: bool = False
) -> None:
    """A contiguous dataset whose storage is allocated when it is created.

    Later row writes then touch raw data only, never HDF5 metadata, so a build killed mid-write
    leaves a structurally intact file: rows not marked done are simply rewritten on resume.
    Without ``zero_fill`` the space is not initialised (instant, sparse on most filesystems)."""
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_ALLOC if zero_fill else h5py.h5d.FILL_TIME_NEVER)
    if zero_fill:
        dcpl.set_fill_value(np.zeros((), dtype=dtype))
    space = h5py.h5s.create_simple(shape)
    tid = h5py.h5t.py_create(np.dtype(dtype), logical=True)
    h5py.h5d.create(f.id, name.encode(), tid, space, dcpl=dcpl).close()


def check_self_contained(f: h5py.File, path: Path) -> None:
    """Refuse an HDF5 file whose data lives elsewhere: only hard links to groups and to plain
    datasets stored in the file itself. An external or soft link, a dataset with external
    storage or a virtual dataset would make open and query read another file (and a checksum
    of this one would not cover it)."""

    def visit(group: h5py.Group, prefix: str) -> None:
        for name in group:
            where = f"{path}: {prefix}{name}"
            link = group.get(name, getlink=True)
            if not isinstance(link, h5py.HardLink):
                kind = type(link).__name__.removesuffix("Link").lower()
                raise IndexStateError(
                    f"{where} is {'an' if kind[:1] in 'aeiou' else 'a'} {kind} link, not data stored in the file; an index reads "
                    "nothing outside its folder: rebuild the index"
                )
            obj = group[name]
            if isinstance(obj, h5py.Group):
                visit(obj, f"{prefix}{name}/")
            elif isinstance(obj, h5py.Dataset):
                dcpl = obj.id.get_create_plist()
                if dcpl.get_layout() == h5py.h5d.VIRTUAL or dcpl.get_external_count():
                    what = "a virtual dataset" if obj.is_virtual else "stored in external files"
                    raise IndexStateError(
                        f"{where} is {what}, not data stored in the file; an index reads "
                        "nothing outside its folder: rebuild the index"
                    )

    visit(f, "/")


class VectorStore:
    """Rows of both methods' vectors plus norms, ids and the done/flag masks."""

    def __init__(self, path: str | os.PathLike[str], file: h5py.File):
        self.path = Path(path)
        self.file = file

    # -- creation / opening ----------------------------------------------------------------

    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        ids: np.ndarray,
        dim: int,
        num_checkpoints: int,
        num_draws: int,
        dtype: str,
        attrs: dict[str, Any],
    ) -> VectorStore:
        n = len(ids)
        f = h5py.File(path, "w")
        if ids.dtype.kind in "iu":
            f.create_dataset("ids", data=ids.astype(np.int64))
        else:
            f.create_dataset("ids", data=ids.astype(object), dtype=h5py.string_dtype("utf-8"))
        for name in METHODS:
            _preallocated(f, name, (n, dim), dtype)
        _preallocated(f, "norms", (n, num_checkpoints, num_draws), "float32")
        _preallocated(f, "done", (n,), "uint8", zero_fill=True)
        _preallocated(f, "flagged", (n,), "uint8", zero_fill=True)
        for key, value in {**attrs, "build_id": new_build_id()}.items():  # a new id per file
            f.attrs[key] = value if isinstance(value, (str, int, float)) else json.dumps(value)
        f.flush()
        return cls(path, f)

    @classmethod
    def open(cls, path: str | os.PathLike[str], mode: str = "r") -> VectorStore:
        p = Path(path)
        if not p.exists():
            raise IndexStateError(f"{p}: vector store missing")
        try:
            f = h5py.File(p, mode)
        except OSError as exc:
            raise IndexStateError(f"{p}: not a readable HDF5 file ({exc})") from None
        try:
            check_self_contained(f, p)
        except IndexStateError:
            f.close()
            raise
        missing = [n for n in (*METHODS, "ids", "norms", "done") if n not in f]
        if missing:
            f.close()
            raise IndexStateError(f"{p}: damaged vector store, missing {', '.join(missing)}")
        return cls(p, f)

    def close(self) -> None:
        if self.file.id.valid:
            self.file.close()

    def __enter__(self) -> VectorStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writing ---------------------------------------------------------------------------

    def write_rows(
        self,
        start: int,
        tracin: np.ndarray,
        retrac: np.ndarray,
        norms: np.ndarray,
        flagged: np.ndarray,
    ) -> None:
        """Write rows [start, start + B) and mark them done only after the data is flushed."""
        stop = start + len(tracin)
        self.file["tracin"][start:stop] = tracin
        self.file["retrac"][start:stop] = retrac
        self.file["norms"][start:stop] = norms
        self.file["flagged"][start:stop] = flagged.astype(np.uint8)
        self.file.flush()
        self.file["done"][start:stop] = 1
        self.file.flush()

    def add_column(
        self,
        name: str,
        data: np.ndarray | list[str] | None = None,
        shape: tuple[int, ...] | None = None,
    ) -> None:
        """An extra row-aligned dataset (conditioning: ``labels``, ``prompts``, ``latents``):
        written whole from ``data``, or float32 of ``shape`` preallocated to be filled with
        ``write_column`` before ``write_rows`` marks those rows done."""
        if data is None:
            _preallocated(self.file, name, (self.num_rows, *shape), "float32")
        elif isinstance(data, list) or np.asarray(data).dtype.kind in "USO":
            self.file.create_dataset(
                name, data=np.asarray(data, dtype=object), dtype=h5py.string_dtype("utf-8")
            )
        else:
            self.file.create_dataset(name, data=np.asarray(data))
        self.file.flush()

    def write_column(self, name: str, start: int, values: np.ndarray) -> None:
        """Rows [start, start + B) of an extra dataset (flushed by the next ``write_rows``)."""
        self.file[name][start : start + len(values)] = values

    def column(self, name: str) -> np.ndarray | None:
        """An extra dataset (strings decoded), or None when the store has none of that name."""
        if name not in self.file:
            return None
        ds = self.file[name]
        return ds.asstr()[()] if ds.dtype.kind == "O" else ds[()]

    # -- reading ---------------------------------------------------------------------------

    @property
    def num_rows(self) -> int:
        return int(self.file["ids"].shape[0])

    @property
    def dim(self) -> int:
        return int(self.file["tracin"].shape[1])

    @property
    def ids(self) -> np.ndarray:
        ids = self.file["ids"]
        return ids.asstr()[()] if ids.dtype.kind == "O" else ids[()]

    @property
    def done(self) -> np.ndarray:
        return self.file["done"][()].astype(bool)

    @property
    def flagged(self) -> np.ndarray:
        return self.file["flagged"][()].astype(bool)

    @property
    def norms(self) -> np.ndarray:
        return self.file["norms"][()]

    def vectors(self, method: str, rows: slice | np.ndarray | None = None) -> np.ndarray:
        """Stored rows of one method as float32 [N, D] (or the selected rows)."""
        if method not in METHODS:
            raise IndexStateError(f"unknown method {method!r}")
        ds = self.file[method]
        data = ds[()] if rows is None else ds[rows]
        return np.ascontiguousarray(data, dtype=np.float32)

    def iter_chunks(self, method: str, rows_per_chunk: int = 65536):
        """Yield (start, float32 block) over the rows: for stores larger than RAM."""
        ds = self.file[method]
        for start in range(0, ds.shape[0], rows_per_chunk):
            yield start, np.asarray(ds[start : start + rows_per_chunk], dtype=np.float32)

    def attr(self, key: str) -> Any:
        return self.file.attrs.get(key)

    @property
    def build_id(self) -> str | None:
        """The random id this file was created with (None for files of older versions)."""
        value = self.attr("build_id")
        return None if value is None else str(value)

    def check_manifest(self, manifest: dict[str, Any]) -> None:
        """Refuse a store that is not the one ``manifest`` describes: another build's
        ``vectors.h5`` (its build id, or its spec: seeds, projection...), or another shape."""
        where = f"{self.path}: "
        if "build_id" in manifest and self.build_id != manifest["build_id"]:
            raise IndexStateError(
                where + f"build id {self.build_id} but the manifest's is {manifest['build_id']} "
                "(a file of another build); restore this index's own file or rebuild it"
            )
        if self.num_rows != manifest.get("num_rows") or self.dim != manifest.get("dim"):
            raise IndexStateError(
                where + f"holds {self.num_rows}x{self.dim} rows but the manifest says "
                f"{manifest.get('num_rows')}x{manifest.get('dim')}; rebuild the index"
            )
        text = self.attr("spec")
        if text is None:
            return
        try:
            mine = BuildSpec.from_stored(json.loads(str(text)))
        except (SpecError, ValueError, TypeError) as exc:
            raise IndexStateError(where + f"unreadable spec attribute ({exc})") from None
        theirs = BuildSpec.from_stored(manifest["spec"])
        if mine.fingerprint() != theirs.fingerprint():
            diff = ", ".join(f"{k} {a!r} vs {b!r}" for k, (a, b) in mine.diff(theirs).items())
            raise IndexStateError(
                where + f"built with another spec than the manifest's ({diff}); "
                "a file of another index: restore this index's own file or rebuild it"
            )


class ChunkedRows:
    """Rows [N, D] of ``data`` (h5py dataset, np.memmap, array), read as float32 in chunks.

    rows: sorted rows of ``data`` to use (e.g. the unflagged ones), row i here being
    ``data[rows[i]]``; None uses every row. No read asks ``data`` for more than ``chunk_rows``
    rows (default: 64 MiB of float32).
    """

    def __init__(self, data: Any, rows: np.ndarray | None = None, chunk_rows: int | None = None):
        shape = tuple(getattr(data, "shape", ()))
        if len(shape) != 2 or shape[1] == 0:
            raise SearchError(f"rows must be a 2-D array [N, D] with D >= 1; got shape {shape}")
        self.data = data
        self.dim = int(shape[1])
        self.rows = None if rows is None else np.asarray(rows, dtype=np.int64)
        if (
            self.rows is not None
            and self.rows.size
            and (np.any(np.diff(self.rows) <= 0) or self.rows[0] < 0 or self.rows[-1] >= shape[0])
        ):
            raise SearchError(f"rows must be increasing row numbers below {shape[0]}")
        self.n = int(shape[0] if self.rows is None else len(self.rows))
        if chunk_rows is not None and (not isinstance(chunk_rows, int) or chunk_rows < 1):
            raise SearchError(f"chunk_rows must be a positive integer; got {chunk_rows!r}")
        self.chunk_rows = chunk_rows or max(1024, CHUNK_BYTES // (4 * self.dim))

    @property
    def shape(self) -> tuple[int, int]:
        return self.n, self.dim

    def __len__(self) -> int:
        return self.n

    def chunks(self) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, float32 block [m, D]) in row order, m <= chunk_rows; rejects NaN / inf."""
        total, step = int(self.data.shape[0]), self.chunk_rows
        done = 0
        for a in range(0, total, step):
            b = min(a + step, total)
            if self.rows is None:
                block = self.data[a:b]
            else:
                lo, hi = np.searchsorted(self.rows, [a, b])
                if lo == hi:
                    continue
                block = self.data[a:b]
                if hi - lo < b - a:
                    block = np.asarray(block)[self.rows[lo:hi] - a]
            block = np.ascontiguousarray(block, dtype=np.float32)
            _check_finite(block, done)
            yield done, block
            done += len(block)

    def __getitem__(self, index: Any) -> np.ndarray:
        """Rows by number, any integer array shape [...] -> float32 [..., D]."""
        idx = np.asarray(index, dtype=np.int64)
        flat = idx.ravel()
        if flat.size and (flat.min() < 0 or flat.max() >= self.n):
            raise IndexError(f"row numbers must be in [0, {self.n})")
        uniq, inverse = np.unique(flat, return_inverse=True)
        src = uniq if self.rows is None else self.rows[uniq]
        out = np.empty((len(uniq), self.dim), dtype=np.float32)
        for a in range(0, len(src), self.chunk_rows):
            out[a : a + self.chunk_rows] = self.data[src[a : a + self.chunk_rows]]
        _check_finite(out, None)
        return out[inverse].reshape(*idx.shape, self.dim)


def _check_finite(block: np.ndarray, first: int | None) -> None:
    finite = np.isfinite(block).all(axis=1)
    if not finite.all():
        where = (
            f" (first: row {first + int(np.flatnonzero(~finite)[0])})" if first is not None else ""
        )
        raise SearchError(f"vectors contain NaN or inf{where}; fix or drop those rows")
