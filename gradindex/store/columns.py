"""Row-aligned columns of ``vectors.h5`` read on demand, so opening an index and answering a
query need memory independent of N: a search's k result rows are mapped to ids by reading
those k ids, never the whole column.

Holds ``LazyColumn`` (``ids``, ``flagged``: indexing reads only the rows asked; ``np.asarray``
still gives the whole column for code that wants it), ``IdentityRows`` (search-index row i is
store row i: the map of an index without flagged rows, held as its length only), and
``search_rows`` / ``all_done``, which read the masks a chunk at a time, and the ids' digests
(``column_digests``: one sha256 per block of ``DIGEST_BLOCK`` rows, recorded in the manifest):
a ``LazyColumn`` given them checks each block the first time it reads from it, so a flipped
byte in the ids is refused on first use without hashing the whole file on open.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from gradindex.errors import IndexStateError

CHUNK = 1 << 20  # rows per read when a whole column is scanned
DIGEST_BLOCK = 1 << 14  # rows per ids digest: 128 KiB of int64 ids; a query checks whole blocks


def block_digest(values: np.ndarray) -> str:
    """sha256 of one block of a column's values: int64 little-endian bytes, or the UTF-8
    strings joined by NUL (which an HDF5 string cannot hold)."""
    if values.dtype.kind in "OUS":
        data = "\x00".join(map(str, values)).encode("utf-8", "surrogatepass")
        data += len(values).to_bytes(8, "little")
    else:
        data = np.ascontiguousarray(values, dtype="<i8").tobytes()
    return hashlib.sha256(data).hexdigest()


def column_digests(path: str | os.PathLike[str], name: str) -> list[str]:
    """One ``block_digest`` per ``DIGEST_BLOCK`` rows of a 1-D dataset, read a chunk at a time."""
    col = LazyColumn(path, name)
    with h5py.File(col.path, "r") as f:
        return [
            block_digest(col._raw(f, slice(a, a + DIGEST_BLOCK)))
            for a in range(0, len(col), DIGEST_BLOCK)
        ]


class LazyColumn:
    """One 1-D dataset of an HDF5 file; the file is opened for each read (no handle held).
    ``digests``: the column's ``column_digests`` as recorded at build time; each block is
    checked against its digest the first time a read touches it."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        name: str,
        as_bool: bool = False,
        digests: Sequence[str] | None = None,
    ):
        self.path, self.name, self.as_bool = Path(path), name, as_bool
        self._digests = None if digests is None else list(digests)
        self._checked: set[int] = set()
        with h5py.File(self.path, "r") as f:
            ds = f[name]
            self.shape = tuple(ds.shape)
            self._strings = ds.dtype.kind == "O"
            self.dtype = np.dtype(bool if as_bool else object if self._strings else ds.dtype)
        self.ndim = len(self.shape)
        blocks = -(-self.shape[0] // DIGEST_BLOCK) if self.ndim == 1 else -1
        if self._digests is not None and len(self._digests) != blocks:
            raise IndexStateError(
                f"{self.path}: {self.name} has {self.shape[0]} rows but the manifest records "
                f"digests of {len(self._digests) * DIGEST_BLOCK} at most; restore or rebuild it"
            )

    def __len__(self) -> int:
        return self.shape[0]

    def _raw(self, f: h5py.File, sel: Any) -> np.ndarray:
        ds = f[self.name]
        return np.asarray(ds.asstr()[sel] if self._strings else ds[sel])

    def _read(self, f: h5py.File, sel: Any) -> np.ndarray:
        if self._digests is not None:
            n = len(self)
            if isinstance(sel, slice):
                r = range(*sel.indices(n))
                lo, hi = (min(r[0], r[-1]), max(r[0], r[-1])) if len(r) else (0, -1)
                wanted = range(lo // DIGEST_BLOCK, hi // DIGEST_BLOCK + 1)
            else:
                wanted = np.unique(np.atleast_1d(np.asarray(sel, dtype=np.int64)) // DIGEST_BLOCK)
            for b in wanted:
                self._check_block(f, int(b))
        out = self._raw(f, sel)
        return out.astype(bool) if self.as_bool else out

    def _check_block(self, f: h5py.File, b: int, values: np.ndarray | None = None) -> None:
        """Refuse the column when block ``b``'s values differ from the recorded digest."""
        if self._digests is None or b in self._checked:
            return
        if values is None:
            values = self._raw(f, slice(b * DIGEST_BLOCK, (b + 1) * DIGEST_BLOCK))
        if block_digest(values) != self._digests[b]:
            first = b * DIGEST_BLOCK
            raise IndexStateError(
                f"{self.path}: {self.name} of rows {first}..{first + len(values) - 1} differ "
                "from the manifest's digest (the file was altered or corrupted); restore the "
                "index's own file or rebuild it"
            )
        self._checked.add(b)

    def __getitem__(self, index: Any) -> Any:
        """A slice or an integer reads that range; an integer array of any shape reads only
        those rows (negative ones counted from the end, as numpy does)."""
        n = len(self)
        with h5py.File(self.path, "r") as f:
            if isinstance(index, slice) and (index.step or 1) < 0:  # HDF5 reads ascending
                r = range(*index.indices(n))
                return self._read(f, slice(r[-1], r[0] + 1, -r.step) if r else slice(0, 0))[::-1]
            if isinstance(index, slice):
                return self._read(f, index)
            if isinstance(index, (int, np.integer)):
                return self._read(f, int(index) % n if -n <= index < n else _out_of_range(index, n))
            idx = np.asarray(index, dtype=np.int64)
            flat = np.where(idx.ravel() < 0, idx.ravel() + n, idx.ravel())
            if flat.size and (flat.min() < 0 or flat.max() >= n):
                _out_of_range(int(flat.max()), n)
            if flat.size == 0:
                return np.empty(idx.shape, self._read(f, slice(0, 0)).dtype)
            uniq, inverse = np.unique(flat, return_inverse=True)
            return self._read(f, uniq)[inverse].reshape(idx.shape)

    def chunks(self) -> Iterator[np.ndarray]:
        # whole digest blocks per read when the column has digests, whatever CHUNK is
        step = (
            CHUNK
            if self._digests is None
            else max(DIGEST_BLOCK, CHUNK // DIGEST_BLOCK * DIGEST_BLOCK)
        )
        with h5py.File(self.path, "r") as f:
            for a in range(0, len(self), step):
                block = self._raw(f, slice(a, a + step))
                for j in range(0, len(block), DIGEST_BLOCK):  # checked as read: no second read
                    self._check_block(f, (a + j) // DIGEST_BLOCK, block[j : j + DIGEST_BLOCK])
                yield block.astype(bool) if self.as_bool else block

    def __iter__(self) -> Iterator[Any]:
        for block in self.chunks():
            yield from block

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        whole = self[:]
        return whole if dtype is None else whole.astype(dtype)

    def tolist(self) -> list[Any]:
        return self[:].tolist()

    def sum(self) -> Any:
        return sum(block.sum() for block in self.chunks())

    def any(self) -> bool:
        return any(bool(block.any()) for block in self.chunks())

    def __repr__(self) -> str:
        return f"LazyColumn({self.path.name}:/{self.name}, {len(self)} rows)"


class IdentityRows:
    """Row numbers 0..n-1 held as n: search-index row i is store row i."""

    def __init__(self, n: int):
        self.n = int(n)
        self.shape, self.ndim, self.dtype = (self.n,), 1, np.dtype(np.int64)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: Any) -> Any:
        return (
            np.arange(self.n, dtype=np.int64)[index]
            if isinstance(index, slice)
            else _rows(index, self.n)
        )

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return np.arange(self.n, dtype=dtype or np.int64)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.n))


def _rows(index: Any, n: int) -> Any:
    idx = np.asarray(index, dtype=np.int64)
    out = np.where(idx < 0, idx + n, idx)
    if out.size and (out.min() < 0 or out.max() >= n):
        _out_of_range(int(out.max()), n)
    return out if out.ndim else int(out)


def _out_of_range(i: int, n: int) -> int:
    raise IndexError(f"row {i} is out of range for {n} rows")


def search_rows(flagged: LazyColumn) -> IdentityRows | np.ndarray:
    """Search-index row i → store row: the unflagged rows in order. Without flagged rows (a
    chunked scan says so) it is the identity, held as its length; with some, an array of the
    kept rows (8 bytes each)."""
    if not flagged.any():
        return IdentityRows(len(flagged))
    base, parts = 0, []
    for block in flagged.chunks():
        parts.append(base + np.flatnonzero(~block))
        base += len(block)
    return np.concatenate(parts)


def all_done(path: str | os.PathLike[str]) -> bool:
    """Whether every row of the store is marked done, read a chunk at a time."""
    col = LazyColumn(path, "done", as_bool=True)
    return all(bool(block.all()) for block in col.chunks())
