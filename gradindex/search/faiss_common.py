"""What the in-RAM and the on-disk FAISS indexes share: the thread policy, the checks of a build's
arguments and rows, the sidecar record, and FAISS errors as one-line messages.

Threads: a single query runs on one thread; batches use the caller's thread count by default:
the OpenMP / torch thread setting of the calling thread, capped by the CPUs the process may use
(``set_num_threads`` or the environment variable ``GRADINDEX_NUM_THREADS`` changes that). The
FAISS wheel and torch share one OpenMP runtime when torch is imported first, so a FAISS thread
setting is a torch thread setting: every build and search restores the caller's count when it
returns (OpenMP keeps the count per calling thread, so other Python threads are untouched). IVF
and HNSW answer one query on one thread anyway (FAISS parallelizes over queries); a flat index
would split its scan over threads, but with the cores shared by other jobs the OpenMP barriers
stall, so one query is slower on two threads than on one. Batches amortize the barriers over
many queries.

Batches: FAISS >= 1.14.2 scans the whole database once per query when ``n_queries * D`` is below
``faiss.cvar.distance_compute_blas_threshold`` (128000 by default), far slower than one blocked
BLAS pass for a batch. Every search sets the threshold to ``4 * D`` so batches of four or more
queries take the BLAS path (1-3 queries are as fast either way). Figures:
docs/search.md#why-the-search-code-is-shaped-this-way.
"""

from __future__ import annotations

import errno
import functools
import os
import re
import sys
from collections.abc import Callable
from importlib import metadata
from typing import Any, TypeVar

import faiss
import numpy as np

from gradindex.errors import SearchError, WriteError
from gradindex.inputs.threads import available_cpus
from gradindex.spec import METHODS
from gradindex.store.layout import FORMAT_VERSION

ON_MISS = ("fallback", "warn", "raise")
BLAS_MIN_QUERIES = 4  # batches this large or larger take FAISS's BLAS path
_num_threads: int | None = None

_F = TypeVar("_F", bound=Callable[..., Any])


def set_num_threads(n: int | None = None) -> int:
    """Set the FAISS threads for batches (None: ``GRADINDEX_NUM_THREADS`` or the caller's count).

    Single queries always run on one thread (see the module docstring). Applies to later builds
    and searches only, never to the caller's torch / OpenMP threads. Returns the batch count.
    """
    global _num_threads
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise SearchError(f"thread count must be a positive integer; got {n!r}")
    _num_threads = n
    return batch_threads()


def batch_threads() -> int:
    """FAISS threads for a batch: set_num_threads, else GRADINDEX_NUM_THREADS, else the caller's
    own count (its OpenMP setting and torch's, when torch is loaded) capped by the usable CPUs."""
    if _num_threads is not None:
        return _num_threads
    env = os.environ.get("GRADINDEX_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    n = min(faiss.omp_get_max_threads(), available_cpus())
    torch = sys.modules.get("torch")  # never imported here: the search layer does not need it
    if torch is not None and hasattr(torch, "get_num_threads"):
        n = min(n, torch.get_num_threads())
    return max(1, n)


def restores_threads(fn: _F) -> _F:
    """Decorate a function that calls :func:`configure`: the caller's OpenMP thread count (also
    torch's, when the runtime is shared) is put back when it returns or raises."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        before = faiss.omp_get_max_threads()
        try:
            return fn(*args, **kwargs)
        finally:
            faiss.omp_set_num_threads(before)

    return wrapper  # type: ignore[return-value]


def configure(dim: int, single_query: bool = False) -> int:
    """Apply the thread and BLAS-threshold policy (module docstring); returns the batch threads.
    Only inside a function decorated with :func:`restores_threads`."""
    n = batch_threads()
    faiss.omp_set_num_threads(1 if single_query else n)
    if dim:
        faiss.cvar.distance_compute_blas_threshold = BLAS_MIN_QUERIES * dim
    return n


def check_build_args(method: str, on_miss: str, target_recall: Any, seed: Any) -> None:
    """Refuse a build's method, on_miss, target recall or seed by reason."""
    if method not in METHODS:
        raise SearchError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
    if on_miss not in ON_MISS:
        raise SearchError(f"unknown on_miss {on_miss!r}; use one of {', '.join(ON_MISS)}")
    if not isinstance(target_recall, int | float) or not 0 < target_recall <= 1:
        raise SearchError(f"target_recall must be in (0, 1]; got {target_recall!r}")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        raise SearchError(f"seed must be an integer; got {seed!r}")


def check_common_norm(norms: np.ndarray, rtol: float = 1e-2) -> None:
    """ReTrac rows must share one norm, so that inner product ranks as cosine: refuse rows whose
    ``norms`` differ by more than ``rtol`` (float16 storage rounds norms by ~1e-3)."""
    lo, hi = float(np.min(norms)), float(np.max(norms))
    if not lo > 0 or hi > lo * (1 + rtol):
        raise SearchError(
            f"method 'retrac' ranks by cosine, which inner product gives only over rows of one "
            f"norm; these rows have norms from {lo:.4g} to {hi:.4g}: pass rows / their norms "
            "(x / np.linalg.norm(x, axis=1, keepdims=True)), or use method 'tracin' to rank "
            "by raw inner product"
        )


def sidecar_dict(info: dict[str, Any]) -> dict[str, Any]:
    """The ``.json`` sidecar written next to a FAISS file: format, versions and ``info``."""
    try:
        version = metadata.version("gradindex")
    except metadata.PackageNotFoundError:
        version = "unknown"
    return {
        "class": "VectorIndex",
        "format": FORMAT_VERSION,
        "gradindex_version": version,
        "faiss_version": faiss.__version__,
        "info": {k: v for k, v in info.items() if k != "mmap"},
    }


def first_line(e: Exception) -> str:
    """The last non-empty line of an error's text (FAISS puts the reason there)."""
    lines = [s for s in str(e).splitlines() if s.strip()]
    return lines[-1].strip() if lines else type(e).__name__


def faiss_reason(e: Exception) -> str:
    """A FAISS C++ error without its source location ("Error in <signature> at <file>:<line>:")
    and failed-check prefix, e.g. "could not parse index string bogus"."""
    text = first_line(e)
    text = re.sub(r"^Error in .*? at \S+:\d+: ", "", text)
    return re.sub(r"^Error: '.*?' failed: ?", "", text) or text


def write_failure(path: object, e: Exception) -> WriteError | None:
    """``e``, raised while writing the file ``path``, as a one-line WriteError carrying the OS
    error FAISS reports in its message ("write error in ...: 10 != 20 (No space left on
    device)", "could not open ... for writing: Permission denied"); None if it is no write
    failure."""
    if isinstance(e, OSError):
        return WriteError(f"cannot write {path}: {e.strerror or e}", e.errno)
    text = str(e)
    if "write error" not in text and "for writing" not in text:
        return None
    code = next(
        (c for c in sorted(errno.errorcode) if text.rstrip(")").endswith(os.strerror(c))), None
    )
    why = os.strerror(code) if code is not None else faiss_reason(e)
    return WriteError(f"cannot write {path}: {why}", code)
