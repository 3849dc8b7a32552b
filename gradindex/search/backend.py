"""The search-backend interface: what the query side asks of FAISS, the on-disk IVF, Milvus, or
whatever backend comes next.

Holds:

- :class:`SearchResult` -- scores, ids and row numbers of a search, best first.
- :class:`SearchBackend` -- one method's rows, searched by inner product. A backend implements
  :meth:`SearchBackend.search_rows` (and sets ``dim`` / ``num_rows``); the checks every backend
  shares (query matrix, k) run once, in :meth:`SearchBackend.search`.
- :class:`StoreRows` -- a backend over a subset of the store rows (FAISS indexes hold the
  unflagged rows in order) answering in store row numbers.
- :func:`as_matrix`, :func:`as_queries`, :func:`check_k`, :func:`check_backends` -- those checks.
- :func:`result_to_json` -- one JSON-able record per query row of a result.

Row convention: ``rows`` of a result are row numbers of ``vectors.h5`` (never a flagged row,
since no backend of an index folder holds one), best first, equal scores ordered by row number;
``scores`` are float32 [B, k] inner products of the vectors as given. A VectorIndex built over a
bare matrix has that matrix as its store: its rows are the matrix's rows.

Queries: a float32-convertible [B, D] matrix of finite numbers with D = ``dim``; anything else
(1-D, wrong D, NaN, strings) raises SearchError saying what is wrong (``AttributionIndex.search``
also takes one query as a [D] vector). k: a positive integer; k > ``num_rows`` warns and returns
all ``num_rows`` rows.
"""

from __future__ import annotations

import operator
import warnings
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from gradindex.errors import IndexStateError, SearchError
from gradindex.store.columns import IdentityRows


@dataclass(frozen=True)
class SearchResult:
    """Search results, best first. ``scores, ids = result`` unpacks the two users need.

    scores [B, k] float32 inner products; ids [B, k] (row numbers from a backend, sample ids once
    the attribution layer swaps them in); rows [B, k] int64 row numbers. Equal scores are ordered
    by row number (which of several rows tied at the k-th score makes the cut is the backend's
    choice). resized: the query images' (H, W) when they were resized to the model's size.
    """

    scores: np.ndarray
    ids: np.ndarray
    rows: np.ndarray
    resized: tuple[int, int] | None = None

    def __iter__(self):
        yield self.scores
        yield self.ids


class SearchBackend(ABC):
    """Top-k inner-product search over one method's rows (see the module docstring for rows)."""

    dim: int
    """Dimension D of the rows and of the queries."""

    @property
    @abstractmethod
    def num_rows(self) -> int:
        """How many rows a search can return."""

    def search(self, queries: Any, k: Any, exact: bool = False) -> SearchResult:
        """Top-k rows for each query [B, D], best first (checks the queries and k, then asks
        :meth:`search_rows`). ``exact=True`` asks an approximate backend for exact search."""
        q = as_matrix(queries, "queries", self.dim)
        k = check_k(k, self.num_rows)
        return self.search_rows(q, k, exact)

    @abstractmethod
    def search_rows(self, q: np.ndarray, k: int, exact: bool) -> SearchResult:
        """Top-k of checked queries ``q`` (float32 [B, dim], finite), 1 <= k <= num_rows: k
        valid rows per query, best first, ties by row number."""

    def to_gpu(self) -> bool:
        """Answer searches on the GPU if the backend can; returns whether it now does."""
        return False


class StoreRows(SearchBackend):
    """``inner``, whose row i is store row ``rows[i]``, answering in store row numbers."""

    def __init__(self, inner: SearchBackend, rows: np.ndarray | IdentityRows) -> None:
        if len(rows) != inner.num_rows:
            raise IndexStateError(
                f"a search index of {inner.num_rows} rows cannot stand for {len(rows)} store rows"
            )
        self.inner = inner
        # IdentityRows (nothing flagged) stays its length: memory independent of N
        self.rows = rows if isinstance(rows, IdentityRows) else np.asarray(rows, dtype=np.int64)
        self.dim = inner.dim

    @property
    def num_rows(self) -> int:
        return len(self.rows)

    def search_rows(self, q: np.ndarray, k: int, exact: bool) -> SearchResult:
        res = self.inner.search_rows(q, k, exact)
        rows = self.rows[res.rows]  # increasing map: ties stay ordered by row number
        return SearchResult(scores=res.scores, ids=rows.copy(), rows=rows)

    def to_gpu(self) -> bool:
        return self.inner.to_gpu()


def as_matrix(a: Any, name: str, dim: int | None = None) -> np.ndarray:
    """A contiguous float32 [N, D] copy/view of ``a``, or SearchError saying what is wrong."""
    try:
        arr = np.asarray(a)
    except (TypeError, ValueError) as e:
        raise SearchError(f"{name} is not an array ({e}); pass a float32 matrix [N, D]") from None
    if arr.dtype.kind not in "biuf":
        raise SearchError(f"{name} has dtype {arr.dtype}; pass real numbers (float32)")
    if arr.ndim != 2:
        raise SearchError(
            f"{name} must be a 2-D array [N, D]; got shape {arr.shape} "
            "(a single vector v goes in as v[None, :])"
        )
    if arr.shape[1] == 0:
        raise SearchError(f"{name} have dimension 0; pass vectors with at least one coordinate")
    if dim is not None and arr.shape[1] != dim:
        raise SearchError(
            f"{name} have dimension {arr.shape[1]} but the index holds {dim}-dimensional "
            "vectors; embed them with the same spec and projection"
        )
    with np.errstate(over="ignore"):  # overflow to inf is reported just below
        arr = np.ascontiguousarray(arr, dtype=np.float32)
    finite = np.isfinite(arr).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise SearchError(
            f"{name} contain NaN or inf in {bad.size} row(s) (first: row {bad[0]}) after "
            "conversion to float32; fix or drop those rows"
        )
    return arr


def as_queries(vectors: Any, dim: int) -> np.ndarray:
    """Query rows [B, D], or one query [D] as [1, D], checked as :func:`as_matrix` does."""
    q = np.asarray(vectors) if not isinstance(vectors, np.ndarray) else vectors
    if q.ndim == 1:
        q = q[None]
    return as_matrix(q, "query vectors", dim)


def check_k(k: Any, n: int | None = None, rows: str = "indexed rows") -> int:
    """k as a positive int; clamped, with a warning, to the ``n`` rows there are (if given)."""
    try:
        if isinstance(k, bool):
            raise TypeError
        k = operator.index(k)
    except TypeError:
        raise SearchError(f"k={k!r}: must be a positive integer") from None
    if k <= 0:
        raise SearchError(f"k={k}: must be a positive integer")
    if n is not None and k > n:
        warnings.warn(f"k={k} exceeds the {n} {rows}; returning all of them", stacklevel=3)
        k = n
    return k


def check_backends(
    backends: Mapping[str, SearchBackend], methods: tuple[str, ...], dim: int, num_rows: int
) -> dict[str, SearchBackend]:
    """One backend per stored method, over ``num_rows`` rows of dimension ``dim``, or
    IndexStateError naming the one that does not fit."""
    out = {}
    for method in methods:
        backend = backends.get(method)
        if not isinstance(backend, SearchBackend):
            raise IndexStateError(
                f"no search backend for method {method!r} (got {type(backend).__name__}); "
                "pass one gradindex.search.backend.SearchBackend per method"
            )
        if backend.dim != dim or backend.num_rows != num_rows:
            raise IndexStateError(
                f"the {method} backend holds {backend.num_rows} rows of dimension {backend.dim} "
                f"but this index has {num_rows} unflagged rows of dimension {dim}"
            )
        out[method] = backend
    return out


def result_to_json(result: SearchResult, method: str) -> list[dict[str, Any]]:
    """One JSON-able record per query row; ``resized``: the query's [H, W] before it was
    resized to the model's size, or null."""
    resized = None if result.resized is None else [int(v) for v in result.resized]
    return [
        {
            "method": method,
            "ids": [x.item() if hasattr(x, "item") else x for x in ids],
            "rows": rows.tolist(),
            "scores": [float(s) for s in scores],
            "resized": resized,
        }
        for scores, ids, rows in zip(result.scores, result.ids, result.rows, strict=True)
    ]
