"""Each kernel method's recall through the search index it uses, measured when its kernel is
written, and exact search where that recall misses the index's target.

``trak`` / ``retrak`` search the TracIn / ReTrac index with transformed queries, which are not
the queries that index was tuned on: an HNSW tuned to 0.96 recall@10 for TracIn queries
answered transformed ones at 0.48. So after ``kernel.h5`` is written, held-out queries (stored
rows perturbed as in :func:`gradindex.search.tuning.heldout_queries`) are transformed by the
kernel and searched approximately and exactly; the recall@10 is recorded per kernel method in
the manifest's ``kernel.search`` entry, and a method whose recall misses the target searches
exactly (``exact_search``), which ``AttributionIndex.search`` obeys. A dual-form kernel
(``kernel.h5`` format 3, N < d) scores every indexed row itself: exact by construction, and
``share_rows`` points it at the rows its flat FAISS index already holds (one copy in memory).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from gradindex.errors import IndexStateError
from gradindex.search.backend import StoreRows
from gradindex.search.faiss_index import VectorIndex
from gradindex.search.tuning import RECALL_K, heldout_queries
from gradindex.store.kernel import KERNEL_METHODS, too_wide, write_kernel
from gradindex.store.kernel_dual import DualKernel
from gradindex.store.kernel_load import load_kernel
from gradindex.store.layout import (
    KERNEL,
    MANIFEST,
    VECTORS,
    check_files,
    faiss_file,
    file_digest,
    read_manifest,
    write_json_atomic,
)
from gradindex.store.vectors import VectorStore

RECALL_QUERIES = 400
"""Held-out queries per kernel method (two halves must both reach the target)."""
DEFAULT_TARGET = 0.95


def searches_exactly(manifest: dict[str, Any], method: str) -> bool:
    """Whether kernel ``method`` searches exactly: its recall missed the target when measured
    (False for a kernel written before it was measured)."""
    search = (manifest.get("kernel") or {}).get("search") or {}
    return bool((search.get(method) or {}).get("exact_search", False))


def share_rows(kernel: Any, backend: Any) -> Any:
    """``kernel``, made to score the rows its search index already holds in RAM where it is a
    dual kernel over a flat / HNSW FAISS index (the same kept rows in the same order), so a
    served index keeps one copy of them, not two; any other kernel or backend as it is."""
    backend = backend.inner if isinstance(backend, StoreRows) else backend  # flagged rows
    if isinstance(kernel, DualKernel) and isinstance(backend, VectorIndex):
        rows = backend.flat_rows()
        if rows is not None and rows.shape[0] == kernel.num_rows:
            kernel.use_rows(rows)
    return kernel


def with_search_record(folder: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """``manifest["kernel"]`` with each kernel method's measured ``search`` added (a skipped
    kernel as it is)."""
    kernel = manifest["kernel"]
    if "skipped" in kernel:
        return kernel
    return {**kernel, "search": kernel_search_record(folder, manifest)}


def add_kernel(folder: str | os.PathLike[str], exact: bool = False) -> dict[str, Any]:
    """Compute (or recompute) the kernel of a finished index built before it existed, and
    record it in the manifest (rewritten atomically); every other file is first checked
    against its recorded checksum, so a damaged index is never blessed. Returns the record.
    ``exact``: keep every eigenpair (see ``kernel.write_kernel``).
    The caller holds the folder's writer lock (``lifecycle.folder_lock``; the CLI does)."""
    path = Path(folder)
    manifest = read_manifest(path)
    others = {k: v for k, v in manifest.get("files", {}).items() if k != KERNEL}
    problems = check_files(path, {**manifest, "files": others}, checksums=True)
    if problems:
        raise IndexStateError(f"{problems[0]}; rebuild the index")
    with VectorStore.open(path / VECTORS) as store:
        store.check_manifest(manifest)
    weights = [float(c["weight"]) for c in manifest["checkpoints"]]
    with VectorStore.open(path / VECTORS) as store:
        why = too_wide(store.dim // len(weights))
    if why is not None:
        raise IndexStateError(f"{path}: no kernel for this index: {why}")
    record = write_kernel(path, weights, manifest.get("build_id"), exact=exact)
    record = with_search_record(path, {**manifest, "kernel": record})
    kpath = path / KERNEL
    files = {**others, KERNEL: {"bytes": kpath.stat().st_size, "sha256": file_digest(kpath)}}
    write_json_atomic(path / MANIFEST, {**manifest, "kernel": record, "files": files})
    return record


def kernel_search_record(folder: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """{kernel method: {recall_at_10, target_recall, exact_search, measured_on}} for an index
    folder whose kernel.h5 and FAISS indexes are written (``manifest``: at least ``kernel``,
    ``checkpoints``, ``dim``, ``num_rows``, ``build_id``, ``indexes``)."""
    out = {}
    with VectorStore.open(folder / VECTORS) as store:
        keep = np.flatnonzero(~store.flagged)
        manifest = {"dim": store.dim, "num_rows": store.num_rows, **manifest}
        forms = manifest["kernel"].get("form") or {}
        for method, rows in KERNEL_METHODS.items():
            meta = (manifest.get("indexes") or {}).get(rows) or {}
            target = float(meta.get("target_recall") or DEFAULT_TARGET)
            flat = meta.get("kind", "flat") == "flat" or not (folder / faiss_file(rows)).exists()
            if flat or forms.get(rows) == "dual":
                why = "dual form: scores every row" if forms.get(rows) == "dual" else "flat index"
                out[method] = {
                    "recall_at_10": 1.0,
                    "target_recall": target,
                    "exact_search": True,
                    "measured_on": f"exact by construction ({why})",
                }
                continue
            out[method] = _measure(folder, manifest, store, keep, method, target)
    return out


def recall_queries(store: VectorStore, keep: np.ndarray, rows: str, seed: int) -> np.ndarray:
    """The held-out queries (before the kernel's transform) a row set's kernel method is
    measured on: RECALL_QUERIES perturbed copies of a seeded sample of its unflagged rows."""
    rng = np.random.default_rng(seed + 7)
    pick = np.sort(rng.choice(len(keep), size=min(len(keep), RECALL_QUERIES), replace=False))
    return heldout_queries(store.vectors(rows, keep[pick]), RECALL_QUERIES, seed + 7)


def _measure(
    folder: Path,
    manifest: dict[str, Any],
    store: VectorStore,
    keep: np.ndarray,
    method: str,
    target: float,
) -> dict[str, Any]:
    """Recall@10 of ``method``'s transformed held-out queries through its stored method's
    index (its own knobs) against exact search of the same index, on both halves."""
    rows = KERNEL_METHODS[method]
    queries = recall_queries(store, keep, rows, int(manifest.get("spec", {}).get("seed", 0)))
    q = load_kernel(folder, {**manifest, "files": {}}, rows).transform(queries)
    vindex = VectorIndex.load(folder / faiss_file(rows))
    k = min(RECALL_K, len(keep))
    approx = vindex.search_rows(q, k).scores
    exact = vindex.search_rows(q, k, exact=True).scores
    tol = 1e-5 * np.abs(exact[:, :1]) + 1e-30
    hits = approx >= exact[:, -1:] - tol  # by score: exact ties are not misses
    half = len(q) // 2
    recall = float(hits.mean())
    worst = min(float(hits[:half].mean()), float(hits[half:].mean()))
    return {
        "recall_at_10": recall,
        "target_recall": target,
        "exact_search": worst < target,
        "measured_on": f"{len(q)} perturbed-row queries transformed by the kernel "
        f"(both halves >= target for approximate search; worst half {worst:.3f})",
    }
