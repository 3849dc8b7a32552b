"""An index folder's life as a unit: one writer at a time, written beside it, swapped in whole.

build, merge and add write a new version of an index folder in a hidden staging folder beside
it (``staging_path``), holding ``folder_lock`` (flock on ``.<name>.lock`` beside the folder, so a
second writer is refused and a killed one never blocks the next), then ``swap_in`` makes it the
folder in one atomic exchange on Linux: a process killed at any point leaves either the old
folder or the new one, never a mix.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from gradindex.errors import GradIndexError, IndexStateError
from gradindex.store.layout import MANIFEST, lock_file


def check_target(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise IndexStateError(f"{out}: exists and is not a folder; choose another output")
    if out.exists() and any(out.iterdir()):
        if not (out / MANIFEST).exists():
            raise IndexStateError(f"{out}: folder is not empty and holds no index; choose another")
        if not overwrite:
            raise IndexStateError(f"{out}: already holds a finished index; pass --overwrite")
        check_writable(out, "overwrite it")


@contextlib.contextmanager
def folder_lock(target: Path, advice: str | None = None) -> Iterator[None]:
    """Hold an exclusive lock on the index folder ``target`` while writing it (build, add, merge).

    The lock is ``flock`` on ``.<name>.lock`` beside the folder (beside, so the folder holds only
    index files and a staging folder swapped in for it needs no lock of its own). The kernel
    releases it when the process exits or is killed, so a crashed writer never blocks the next
    one; the file is removed on a normal exit. ``advice``: what to do when the lock cannot be
    created (default: make the folder it goes in writable).
    """
    path = lock_file(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd = _acquire(path, target)
    except OSError as exc:
        raise IndexStateError(
            f"{target}: cannot create the lock file {path} ({exc.strerror or exc}); "
            + (advice or f"make {target.parent} writable")
        ) from None
    try:
        yield
    finally:
        path.unlink(missing_ok=True)  # still holding it: a waiting writer re-opens a fresh file
        os.close(fd)


def _acquire(path: Path, target: Path) -> int:
    """An fd holding the flock of the lock file at ``path`` (the file there now, not one a
    finishing writer has just removed), with this process's id written in it."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip()
            os.close(fd)
            raise IndexStateError(
                f"{target}: another gradindex process{f' (pid {holder})' if holder else ''} is "
                "writing this index; wait for it to finish or stop it, then run again"
            ) from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
            return fd
        os.close(fd)  # its holder removed it as we opened it: take the next one


def check_writable(target: Path, purpose: str) -> None:
    """Refuse to replace a folder its owner made read-only (no owner write bit, or not writable
    for this process): its next version would be swapped in writable, and removing the old one
    would fail half-way."""
    if not os.access(target, os.W_OK) or not target.stat().st_mode & 0o200:
        raise IndexStateError(
            f"{target}: the folder is read-only; make it writable (chmod u+w) to {purpose}"
        )


def staging_path(target: Path) -> Path:
    """The hidden folder beside ``target`` where its next version is written."""
    return target.parent / f".{target.name}.staging"


def staging_folder(target: Path) -> Path:
    """``staging_path(target)``, emptied: a leftover from a killed merge/add/overwrite is
    removed (it never holds the only copy of anything)."""
    stage = staging_path(target)
    if stage.exists():
        shutil.rmtree(stage)
    return stage


def swap_in(stage: Path, target: Path) -> None:
    """Make the finished ``stage`` folder the ``target`` folder.

    An absent or empty target is replaced by one rename. An existing one is exchanged with the
    stage in one atomic ``renameat2(RENAME_EXCHANGE)`` (Linux), then the old version is deleted;
    elsewhere it is moved aside first, so a crash between the two renames leaves the old version
    complete under ``.<name>.old`` rather than a mixed folder.
    """
    if target.exists() and not any(target.iterdir()):
        target.rmdir()
    if not target.exists():
        os.replace(stage, target)
        _fsync_dir(target.parent)
        return
    if _exchange(stage, target):
        _fsync_dir(target.parent)
        shutil.rmtree(stage)
        return
    old = target.parent / f".{target.name}.old"
    if old.exists():
        shutil.rmtree(old)
    os.replace(target, old)
    os.replace(stage, target)
    _fsync_dir(target.parent)
    shutil.rmtree(old)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with Linux renameat2; False where that is not available."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    rc = fn(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), rename_exchange)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise GradIndexError(f"cannot move {a} into place at {b}: {os.strerror(err)}")


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
