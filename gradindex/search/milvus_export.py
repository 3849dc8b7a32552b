"""Exporting an index folder to Milvus: both methods' rows into two collections, in chunks,
each checked against the folder's exact FAISS search (see :mod:`gradindex.search.milvus`)."""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from gradindex.errors import IndexStateError, MilvusError
from gradindex.search import tuning as st
from gradindex.search.faiss_common import METHODS
from gradindex.search.faiss_index import VectorIndex
from gradindex.search.milvus_client import (
    MAX_NPROBE,
    META_KEY,
    METRICS,
    MILVUS_KINDS,
    REQUEST_BYTES,
    collection_name,
    connect,
    default_name,
    message,
    nlist_for,
    pymilvus_module,
    search_collection,
)
from gradindex.store.layout import (
    FORMAT_VERSION,
    VECTORS,
    check_files,
    faiss_file,
    package_versions,
    read_manifest,
)
from gradindex.store.vectors import VectorStore

logger = logging.getLogger(__name__)

_CHECK_QUERIES = 64  # held-out queries per method for the recall check after an export


def export_index(
    path: str | os.PathLike[str],
    uri: str,
    *,
    name: str | None = None,
    kind: str = "flat",
    overwrite: bool = False,
    target_recall: float = 0.95,
    token: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Load both methods' rows of the finished index folder ``path`` into Milvus at ``uri``.

    kind: ``flat`` (exact; default) or ``ivf`` (IVF_FLAT, ~4 sqrt(N) lists, nprobe raised until
    recall@10 against exact search reaches ``target_recall`` on held-out queries). Existing
    collections of the same name are refused unless ``overwrite``. Rows are read and inserted
    a chunk at a time (never the whole matrix). Returns {"uri", "name", "collections": {method:
    record}}, each record with the measured ``recall_at_10`` against the folder's exact search.
    """
    if kind not in MILVUS_KINDS:
        raise MilvusError(
            f"unknown Milvus index kind {kind!r}; use one of {', '.join(MILVUS_KINDS)}"
        )
    if not isinstance(target_recall, int | float) or not 0 < target_recall <= 1:
        raise MilvusError(f"target_recall must be in (0, 1]; got {target_recall!r}")
    folder = Path(path)
    manifest = read_manifest(folder)
    problems = check_files(folder, manifest, checksums=False)
    if problems:
        raise IndexStateError(f"{problems[0]}; rebuild the index")
    name = default_name(folder) if name is None else name
    names = {m: collection_name(name, m) for m in METHODS}
    client = connect(uri, token)
    try:
        taken = [c for c in names.values() if client.has_collection(c)]
        if taken and not overwrite:
            raise MilvusError(
                f"collection {taken[0]} already exists in {uri}; pass --overwrite to replace it"
            )
        out: dict[str, Any] = {"uri": str(uri), "name": name, "collections": {}}
        with VectorStore.open(folder / VECTORS) as store:
            store.check_manifest(manifest)  # rows of another build would be exported
            if not store.done.all():
                raise IndexStateError(f"{folder / VECTORS}: rows never written; resume the build")
            rows = np.flatnonzero(~store.flagged)  # the rows the FAISS indexes hold
            if rows.size == 0:
                raise IndexStateError(f"{folder}: every row is flagged; nothing to export")
            ids = store.ids
            for method in METHODS:
                meta = {
                    "format": FORMAT_VERSION,
                    "method": method,
                    "metric": METRICS[method],
                    "kind": kind,
                    "rows": int(rows.size),
                    "dim": store.dim,
                    "vectors_sha256": manifest["files"][VECTORS]["sha256"],
                    "gradindex_version": package_versions().get("gradindex", "unknown"),
                    "complete": False,
                }
                coll = names[method]
                if client.has_collection(coll):
                    client.drop_collection(coll)
                _create(client, coll, store.dim, ids, meta)
                _insert(client, coll, store, method, rows, ids, progress)
                # sync=False: waiting here polls an RPC Milvus Lite lacks (it logs a traceback);
                # load_collection below waits until the collection is searchable anyway
                client.create_index(coll, _index_params(client, meta), sync=False)
                client.load_collection(coll)
                exact = VectorIndex.load(folder / faiss_file(method), mmap=True)
                meta.update(_check(client, coll, meta, store, method, rows, exact, target_recall))
                meta["complete"] = True
                client.alter_collection_properties(coll, properties={META_KEY: json.dumps(meta)})
                out["collections"][method] = {"collection": coll, **meta}
                logger.info("exported %s: %s", coll, meta)
        return out
    except pymilvus_module().exceptions.MilvusException as e:
        raise MilvusError(f"Milvus at {uri}: {message(e)}") from None
    finally:
        client.close()


def _create(client: Any, coll: str, dim: int, ids: np.ndarray, meta: dict[str, Any]) -> None:
    dt = pymilvus_module().DataType
    schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("row", dt.INT64, is_primary=True)
    if ids.dtype.kind in "iu":
        schema.add_field("sample_id", dt.INT64)
    else:
        longest = max((len(str(s).encode()) for s in ids), default=1)
        schema.add_field("sample_id", dt.VARCHAR, max_length=min(max(longest, 1), 65535))
    schema.add_field("norm", dt.FLOAT)
    schema.add_field("vector", dt.FLOAT_VECTOR, dim=dim)
    client.create_collection(
        coll, schema=schema, consistency_level="Strong", properties={META_KEY: json.dumps(meta)}
    )


def _insert(
    client: Any,
    coll: str,
    store: VectorStore,
    method: str,
    rows: np.ndarray,
    ids: np.ndarray,
    progress: bool,
) -> None:
    """Insert the unflagged rows chunk by chunk, reading each chunk from the store."""
    per_chunk = max(1, min(10_000, REQUEST_BYTES // (4 * store.dim)))
    keep = np.zeros(store.num_rows, dtype=bool)
    keep[rows] = True
    bar = tqdm(total=int(rows.size), unit="row", desc=f"milvus {method}", disable=not progress)
    with bar:
        for start, block in store.iter_chunks(method, per_chunk):  # [B, D] float32
            sel = np.flatnonzero(keep[start : start + len(block)])
            if sel.size == 0:
                continue
            x = block[sel]
            sample_ids = ids[start + sel].tolist()  # plain int / str
            norms = np.linalg.norm(x, axis=1).tolist()
            entities = [
                {"row": int(start + i), "sample_id": sid, "norm": nrm, "vector": vec}
                for i, sid, nrm, vec in zip(sel, sample_ids, norms, x, strict=True)
            ]
            client.insert(coll, entities)
            bar.update(sel.size)
    client.flush(coll)


def _index_params(client: Any, meta: dict[str, Any]) -> Any:
    params = client.prepare_index_params()
    if meta["kind"] == "ivf":
        meta["nlist"] = nlist_for(meta["rows"])  # as requested; Milvus Lite 3.2 ignores it (128)
        params.add_index(
            "vector",
            index_type="IVF_FLAT",
            metric_type=meta["metric"],
            params={"nlist": meta["nlist"]},
        )
    else:
        params.add_index("vector", index_type="FLAT", metric_type=meta["metric"])
    return params


def _check(
    client: Any,
    coll: str,
    meta: dict[str, Any],
    store: VectorStore,
    method: str,
    rows: np.ndarray,
    exact: VectorIndex,
    target_recall: float,
) -> dict[str, Any]:
    """recall@10 of the collection against the folder's exact FAISS search on held-out queries;
    for IVF, the smallest nprobe (chosen on one half) that reaches target_recall (reported on
    the other half)."""
    rng = np.random.default_rng(0)
    sample = np.sort(rng.choice(rows, size=min(_CHECK_QUERIES, rows.size), replace=False))
    q = st.heldout_queries(store.vectors(method, sample), _CHECK_QUERIES, seed=1)  # [M, D]
    k = min(10, int(rows.size))
    ref = exact.search(q, k, exact=True).scores  # [M, k] best first

    def recall(qs: np.ndarray, ref_s: np.ndarray, nprobe: int | None) -> float:
        res = search_collection(client, coll, meta, qs, k, nprobe)
        valid = res.rows >= 0  # IVF at a small nprobe may return fewer than k rows
        found = np.unique(res.rows[valid])
        x = store.vectors(method, found)  # [F, D]
        s = np.einsum("bd,bkd->bk", qs, x[np.searchsorted(found, np.where(valid, res.rows, 0))])
        tol = 1e-5 * np.abs(ref_s[:, :1]) + 1e-30
        return float((valid & (s >= ref_s[:, -1:] - tol)).mean())

    if meta["kind"] == "flat":
        return {"recall_at_10": recall(q, ref, None)}
    half = len(q) // 2
    # past nlist too: pymilvus 3 sends nlist as a top-level key that Milvus Lite 3.2 ignores
    # (it builds 128 lists); a measured ladder does not depend on knowing the real count
    ladder = [p for p in st.NPROBE_GRID if p < meta["nlist"]]
    ladder += [meta["nlist"] << i for i in range(17) if meta["nlist"] << i < MAX_NPROBE]
    ladder.append(MAX_NPROBE)
    for nprobe in ladder:
        if recall(q[:half], ref[:half], nprobe) >= target_recall:
            break
    meta["nprobe"] = nprobe
    got = recall(q[half:], ref[half:], nprobe)
    if got < target_recall:
        warnings.warn(
            f"{coll}: recall@10 {got:.3f} < target {target_recall} at nprobe={nprobe}",
            stacklevel=3,
        )
    return {"nprobe": nprobe, "recall_at_10": got, "target_recall": float(target_recall)}
