"""Exception types for user-facing mistakes.

Every error a user can cause derives from :class:`GradIndexError`; the CLI turns these into a
one-line ``Error: ...`` message and a non-zero exit code in one place (``cli/main.py``).
"""

from __future__ import annotations


class GradIndexError(Exception):
    """Base class of every error gradindex raises on bad input or bad state."""


class SpecError(GradIndexError, ValueError):
    """A BuildSpec field has an invalid value."""


class DataError(GradIndexError, ValueError):
    """Images or arrays that do not fit the model or are malformed (shape, channels, NaN...)."""


class SampleStopError(DataError):
    """A training sample that could not be read, met while featurizing: the rows before it are
    committed. ``sample``: the sample's own one-line message, without the advice on going on."""

    def __init__(self, message: str, sample: str) -> None:
        super().__init__(message)
        self.sample = sample


class MemoryBudgetError(GradIndexError, ValueError):
    """A memory budget (``--max-memory``) that cannot hold what featurizing one sample needs."""


class ModelError(GradIndexError, ValueError):
    """A checkpoint or scheduler that cannot be loaded or does not match the index."""


class IndexStateError(GradIndexError):
    """An index folder that is missing, incomplete, corrupted or of another format version."""


class WriteError(IndexStateError):
    """A file of an index could not be written (disk full, quota, permissions); ``errno`` holds
    the OS error number when known, so a caller can say how to go on."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


class SearchError(GradIndexError, ValueError):
    """A search request that cannot be answered as asked (bad k, unknown method, bad vectors)."""


class MilvusError(GradIndexError):
    """A Milvus server or collection that cannot be used as asked: pymilvus missing, server
    unreachable, collection missing, taken, or exported from another build of the index."""


def first_line(exc: BaseException) -> str:
    """The one line a user is shown for ``exc``: its message's first non-blank line, or, for an
    error raised without a message, the first line of its class's description — never a bare
    class name such as ``ModelError``."""
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()
    doc = (type(exc).__doc__ or "").strip().splitlines()
    return doc[0].rstrip(".:") if doc else "failed without a message"
