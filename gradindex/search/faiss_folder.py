"""An index folder's own FAISS indexes as search backends, checked to be this build's.

``tracin.faiss`` / ``retrac.faiss`` hold the unflagged rows of ``vectors.h5`` in order; each is
opened as a :class:`~gradindex.search.faiss_index.VectorIndex`, refused unless its bytes match the
manifest's checksum (a flipped byte would change rankings) and its build id, size, dimension,
method, metric and a few of its rows match the folder, and wrapped in
:class:`~gradindex.search.backend.StoreRows` so that it answers in store row numbers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import faiss
import numpy as np

from gradindex.errors import IndexStateError
from gradindex.search.backend import SearchBackend, StoreRows
from gradindex.search.faiss_common import METHODS
from gradindex.search.faiss_index import VectorIndex
from gradindex.store.layout import VECTORS, faiss_file, recorded_digest
from gradindex.store.vectors import VectorStore


def open_faiss_backends(
    folder: Path,
    manifest: dict[str, Any],
    store: VectorStore,
    store_rows: np.ndarray,
    mmap: bool,
) -> dict[str, SearchBackend]:
    """{method: its FAISS index over ``store_rows`` (the unflagged rows), answering in store
    rows}; ``store`` is the folder's open vectors.h5, ``mmap`` maps the indexes' rows."""
    return {
        m: StoreRows(load_checked(folder, manifest, m, store, store_rows, mmap), store_rows)
        for m in METHODS
    }


def load_checked(
    folder: Path,
    manifest: dict[str, Any],
    method: str,
    store: VectorStore,
    store_rows: np.ndarray,
    mmap: bool,
) -> VectorIndex:
    """One method's FAISS index, refused unless it is this build's: its build id, size,
    dimension and metric against the manifest, and a few of its rows against the store."""
    fpath = folder / faiss_file(method)
    if not fpath.exists():
        raise IndexStateError(f"{fpath}: search index missing; rebuild the index")
    vindex = VectorIndex.load(fpath, mmap=mmap)
    info, want_id = vindex.info, manifest.get("build_id")
    if want_id is not None and info.get("build_id") != want_id:
        raise IndexStateError(
            f"{fpath}.json: build id {info.get('build_id')} but the manifest's is {want_id} "
            "(an index of another build); restore this index's own files or rebuild it"
        )
    expected = (len(store_rows), int(manifest["dim"]), method, faiss.METRIC_INNER_PRODUCT)
    found = (vindex.ntotal, vindex.dim, info["method"], vindex.metric)
    if found != expected:
        raise IndexStateError(
            f"{fpath}: holds {found[0]} rows of dimension {found[1]} for {found[2]!r} "
            f"(metric {found[3]}) but this index needs {expected[0]} of dimension "
            f"{expected[1]} for {method!r} (inner product, metric {expected[3]}); rebuild"
        )
    sample = vindex.sample_rows()
    if sample is not None:
        rows, stored = sample
        if not np.array_equal(stored, store.vectors(method, store_rows[rows])):
            raise IndexStateError(
                f"{fpath}: its rows differ from {VECTORS}'s (an index of another build); "
                "restore this index's own files or rebuild it"
            )
    for name in (fpath.name, fpath.name + ".json"):  # a flipped byte anywhere: every row counts
        recorded_digest(folder, manifest, name)
    return vindex
