"""Opening an on-disk index: its lists memory-mapped from the ``.ivfdata`` file beside it.

Holds :func:`read_ondisk` (what ``VectorIndex.load`` calls for kind ``ondisk``),
:func:`release_pages` (after each search, so resident memory does not grow with the lists
probed), the lists file's suffix, the prefetch setting, and :func:`stdout_to_stderr` / :func:`fsync` that the build in
:mod:`gradindex.search.ondisk` uses too. Below both ``search`` and ``ondisk``, so that loading
an on-disk index needs no import of the module that builds one.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import mmap
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import faiss

from gradindex.errors import IndexStateError

IVFDATA_SUFFIX = ".ivfdata"
PREFETCH_THREADS = 0
"""Threads FAISS starts per search to read the probed lists ahead (its default is 32): none,
because starting them costs more than a query over lists already in the page cache; the
searching threads fault the pages in themselves (batches search on every core). Figures:
docs/search.md#why-the-search-code-is-shaped-this-way."""


def read_ondisk(path: str | os.PathLike[str], info: dict[str, Any]) -> faiss.Index:
    """Open the on-disk index at ``path`` with its lists memory-mapped from the ``.ivfdata`` file
    beside it (checked against the size its sidecar ``info`` records)."""
    path = Path(path)
    rec = info.get("ondisk") or {}
    data = path.with_name(str(rec.get("ivfdata", path.name + IVFDATA_SUFFIX)))
    if not data.is_file():
        raise IndexStateError(
            f"{data}: missing; an on-disk index needs its lists file next to {path.name}"
        )
    if data.stat().st_size != rec.get("bytes"):
        raise IndexStateError(
            f"{data}: {data.stat().st_size} bytes but {path.name}.json records {rec.get('bytes')} "
            "(truncated or from another build); rebuild the index"
        )
    with stdout_to_stderr():  # FAISS prints the resolved lists path with printf
        index = faiss.read_index(str(path.resolve()), faiss.IO_FLAG_ONDISK_SAME_DIR)
    lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists)
    lists.prefetch_nthread = PREFETCH_THREADS
    return index


def release_pages(index: faiss.Index) -> None:
    """Unmap the list pages a search touched from this process (``madvise(MADV_DONTNEED)`` on
    the lists' mapping): they stay in the page cache, so the next search finds them without a
    disk read, but the process's resident memory stays flat in N instead of growing by every
    list it ever probed.
    The mapping is the file's, read back on the next touch: nothing is lost. A no-op where
    the platform has no madvise."""
    advice, madvise = getattr(mmap, "MADV_DONTNEED", None), _madvise()
    lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists)
    if advice is None or madvise is None or not isinstance(lists, faiss.OnDiskInvertedLists):
        return
    if lists.totsize:
        madvise(ctypes.c_void_p(int(lists.ptr)), lists.totsize, advice)


@functools.cache
def _madvise() -> Any:
    """libc's madvise, or None where there is none."""
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):  # pragma: no cover - no libc madvise
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return madvise


def fsync(path: Path) -> None:
    """Flush ``path`` to the disk (before it is renamed into place)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Send what C code prints on stdout to stderr for a while (FAISS's on-disk lists report
    progress with ``printf``), so ``--json`` output on stdout stays parseable."""
    try:
        fflush = ctypes.CDLL(None).fflush
        fflush.argtypes = [ctypes.c_void_p]
        if sys.stdout is not None:
            sys.stdout.flush()
        fflush(None)
        saved = os.dup(1)
        os.dup2(2, 1)
    except (OSError, AttributeError, ValueError):
        saved = None
    try:
        yield
    finally:
        if saved is not None:
            fflush(None)
            os.dup2(saved, 1)
            os.close(saved)
