"""Milvus backend: an index's rows in Milvus collections, searched like the FAISS indexes.

Holds:

- :func:`export_index` (:mod:`gradindex.search.milvus_export`) -- copy both methods' rows of a finished index folder into two
  collections (``<name>_tracin``, ``<name>_retrac``), in chunks read from ``vectors.h5``, then
  check each against the folder's exact FAISS search (recall@10 on held-out queries).
- :class:`MilvusBackend` -- connect to those collections and answer ``search(queries, k,
  method)`` with the same :class:`~gradindex.search.backend.SearchResult` as ``VectorIndex``;
  ``backends()`` gives one :class:`MilvusCollection` per method, each a
  :class:`~gradindex.search.backend.SearchBackend` answering in store rows.
- :func:`open_backends` -- what ``AttributionIndex.open(path, milvus=URI)`` searches.
- :func:`default_name`, :func:`collection_name` (:mod:`gradindex.search.milvus_client`) -- how
  collections are named.

Metrics. TracIn rows have very different norms (maximum inner product search), so their
collection is metric ``IP`` on ``FLAT`` (exact) or ``IVF_FLAT``; Milvus's HNSW with IP assumes
normalized vectors, so HNSW is not offered. ReTrac rows all have the norm sqrt(sum_c w_c), so
cosine ranks them as our inner product does: metric ``COSINE``. Milvus returns cosines there;
they are scaled back to inner products (cos x |q| x |row|, the row norm stored beside each row),
so a score means the same from either backend.

Each collection holds ``row`` (primary key: the row number in ``vectors.h5``), ``sample_id``
(the training-sample id, int64 or string), ``norm`` (the row's L2 norm) and ``vector``. Flagged
rows are left out, as in the FAISS indexes. A ``gradindex`` collection property records the
build it came from (the sha256 of ``vectors.h5``), so a stale export is refused on connect.

Milvus Lite (URI: a local path ending in ``.db``) serves the same API as a Milvus server or
cluster (URI ``http://host:19530``); the tests run against it. pymilvus is imported only when
this module talks to Milvus, so the rest of gradindex runs without it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from gradindex.errors import MilvusError, SearchError
from gradindex.search.backend import SearchBackend, SearchResult
from gradindex.search.faiss_common import METHODS
from gradindex.search.milvus_client import (
    MAX_NPROBE,
    MAX_TOPK,
    META_KEY,
    collection_name,
    connect,
    default_name,
    message,
    pymilvus_module,
    search_collection,
)
from gradindex.search.milvus_export import export_index
from gradindex.store.layout import FORMAT_VERSION, VECTORS

__all__ = [
    "MilvusBackend",
    "MilvusCollection",
    "collection_name",
    "default_name",
    "export_index",
    "open_backends",
]


class MilvusBackend:
    """Both methods' collections of one exported index, searched like ``VectorIndex``."""

    def __init__(self, client: Any, uri: str, name: str, meta: dict[str, dict[str, Any]]) -> None:
        """Use :meth:`connect`."""
        self.client = client
        self.uri = uri
        self.name = name
        self.meta = meta  # {method: export record}
        self.dim = int(meta["tracin"]["dim"])

    @classmethod
    def connect(
        cls, uri: str, name: str, *, token: str | None = None, timeout: float = 10.0
    ) -> MilvusBackend:
        """Open the collections ``<name>_tracin`` / ``<name>_retrac`` exported to ``uri``."""
        client = connect(uri, token, timeout)
        meta = {}
        try:
            for method in METHODS:
                coll = collection_name(name, method)
                if not client.has_collection(coll):
                    raise MilvusError(
                        f"no collection {coll} in {uri}; export the index first: "
                        f"gradindex export INDEX --milvus {uri}"
                    )
                props = client.describe_collection(coll).get("properties") or {}
                try:
                    rec = json.loads(props[META_KEY])
                except (KeyError, TypeError, ValueError):
                    raise MilvusError(f"{coll} in {uri} was not made by gradindex export") from None
                if rec.get("format") != FORMAT_VERSION or not rec.get("complete"):
                    raise MilvusError(
                        f"{coll} in {uri} is an unfinished or older export; "
                        "export again with --overwrite"
                    )
                client.load_collection(coll)
                meta[method] = rec
        except BaseException as e:
            client.close()
            if isinstance(e, pymilvus_module().exceptions.MilvusException):
                raise MilvusError(f"Milvus at {uri}: {message(e)}") from None
            raise
        return cls(client, str(uri), name, meta)

    def check_index(self, manifest: dict[str, Any], num_rows: int) -> None:
        """Refuse collections exported from another build of the index (rows were added, ...)."""
        sha = manifest.get("files", {}).get(VECTORS, {}).get("sha256")
        for method, rec in self.meta.items():
            if rec["vectors_sha256"] != sha or rec["rows"] != num_rows:
                raise MilvusError(
                    f"{collection_name(self.name, method)} in {self.uri} was exported from "
                    "another build of this index; export it again with --overwrite"
                )

    def collection(self, method: str) -> MilvusCollection:
        """The search backend of one method's collection."""
        if method not in METHODS:
            raise SearchError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
        return MilvusCollection(self, method)

    def backends(self) -> dict[str, SearchBackend]:
        """{method: its collection as a SearchBackend}, for ``AttributionIndex``."""
        return {m: self.collection(m) for m in METHODS}

    def search(self, queries: np.ndarray, k: int, method: str, exact: bool = False) -> SearchResult:
        """Top-k rows for each query [B, D], best first: scores are inner products (as FAISS),
        rows the row numbers in vectors.h5, ids the training-sample ids. ``exact`` searches
        every IVF list (nprobe = 65536, Milvus's largest; a FLAT collection is always exact)."""
        return self.collection(method).search(queries, k, exact)

    def close(self) -> None:
        self.client.close()

    def __repr__(self) -> str:
        return f"MilvusBackend({self.uri!r}, name={self.name!r})"


class MilvusCollection(SearchBackend):
    """One method's collection: rows are store rows already (the collection's primary key)."""

    def __init__(self, backend: MilvusBackend, method: str) -> None:
        self.backend = backend
        self.method = method
        self.record = backend.meta[method]
        self.dim = backend.dim

    @property
    def num_rows(self) -> int:
        return int(self.record["rows"])

    def search_rows(self, q: np.ndarray, k: int, exact: bool) -> SearchResult:
        """As :meth:`MilvusBackend.search`; an IVF query answered with fewer than k rows is
        searched again over every list (as ``VectorIndex`` falls back to exact search)."""
        if k > MAX_TOPK:
            raise SearchError(f"k={k}: Milvus returns at most {MAX_TOPK} results per query")
        rec, client = self.record, self.backend.client
        coll = collection_name(self.backend.name, self.method)
        try:
            res = search_collection(client, coll, rec, q, k, MAX_NPROBE if exact else None)
            short = np.flatnonzero((res.rows < 0).any(axis=1))
            if short.size and rec["kind"] == "ivf" and not exact:
                redo = search_collection(client, coll, rec, q[short], k, MAX_NPROBE)
                for name in ("scores", "ids", "rows"):
                    getattr(res, name)[short] = getattr(redo, name)
        except pymilvus_module().exceptions.MilvusException as e:
            raise MilvusError(f"Milvus at {self.backend.uri}: {message(e)}") from None
        return res


def open_backends(
    milvus: str | os.PathLike[str] | MilvusBackend,
    folder: Path,
    manifest: dict[str, Any],
    num_rows: int,
) -> dict[str, SearchBackend]:
    """The collections of the index folder ``folder`` at ``milvus`` (a URI, collections named
    after the folder, or a connected MilvusBackend), refused if exported from another build."""
    if not isinstance(milvus, MilvusBackend):
        milvus = MilvusBackend.connect(os.fspath(milvus), default_name(folder))
    milvus.check_index(manifest, num_rows)
    return milvus.backends()
