"""Milvus backend: an index's rows in Milvus collections, searched like the FAISS indexes.

Holds:

- :func:`export_index` -- copy both methods' rows of a finished index folder into two
  collections (``<name>_tracin``, ``<name>_retrac``), in chunks read from ``vectors.h5``, then
  check each against the folder's exact FAISS search (recall@10 on held-out queries).
- :class:`MilvusBackend` -- connect to those collections and answer ``search(queries, k,
  method)`` with the same :class:`~gradindex.index.search.SearchResult` as ``VectorIndex``.
- :func:`default_name`, :func:`collection_name` -- how collections are named.

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
import logging
import os
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from gradindex.errors import IndexStateError, MilvusError, SearchError
from gradindex.index import tuning as st
from gradindex.index.layout import VECTORS, check_files, faiss_file, package_versions, read_manifest
from gradindex.index.search import METHODS, SearchResult, VectorIndex, _as_matrix, check_k
from gradindex.index.store import VectorStore

logger = logging.getLogger(__name__)

MILVUS_KINDS = ("flat", "ivf")
METRICS = {"tracin": "IP", "retrac": "COSINE"}
META_KEY = "gradindex"  # collection property holding the export record (JSON)
FORMAT_VERSION = 1
MAX_TOPK = 16384  # Milvus's limit on k (and on queries per request)
MAX_NPROBE = 65536  # Milvus's limits on nlist and nprobe: this nprobe scans every IVF list
_REQUEST_BYTES = 16 << 20  # rows per insert / queries per search kept under this (gRPC: 64 MiB)
_CHECK_QUERIES = 64  # held-out queries per method for the recall check after an export
_INSTALL = 'the Milvus backend needs pymilvus: pip install "gradindex[milvus]"'


def _pymilvus() -> Any:
    try:
        import pymilvus
    except ImportError:
        raise MilvusError(_INSTALL) from None
    return pymilvus


def default_name(index_path: str | os.PathLike[str]) -> str:
    """Collection-name prefix from the index folder's name (Milvus allows [A-Za-z0-9_])."""
    name = re.sub(r"[^0-9A-Za-z_]", "_", Path(index_path).resolve().name) or "index"
    return name if re.match(r"[A-Za-z_]", name) else f"gi_{name}"


def collection_name(name: str, method: str) -> str:
    """``<name>_<method>``; ``name`` must be a valid Milvus name prefix."""
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,199}", name or ""):
        raise MilvusError(
            f"collection name {name!r}: use letters, digits and underscores, starting with a "
            "letter or underscore"
        )
    return f"{name}_{method}"


def connect(uri: str, token: str | None = None, timeout: float = 10.0) -> Any:
    """A ``pymilvus.MilvusClient``, or MilvusError with a one-line reason.

    ``token`` defaults to the environment variable ``MILVUS_TOKEN`` ("user:password" or an
    API key; empty for Milvus Lite and servers without authentication)."""
    pm = _pymilvus()
    uri = os.fspath(uri)
    if uri.endswith(".db"):
        try:
            import milvus_lite  # noqa: F401
        except ImportError:
            raise MilvusError(
                f"{uri}: a local .db URI is served by Milvus Lite, which is not installed; "
                'pip install "gradindex[milvus]"'
            ) from None
    token = os.environ.get("MILVUS_TOKEN", "") if token is None else token
    try:
        return pm.MilvusClient(uri=uri, token=token, timeout=timeout)
    except pm.exceptions.MilvusException as e:
        raise MilvusError(f"cannot connect to Milvus at {uri}: {_message(e)}") from None


def _message(e: Exception) -> str:
    return str(getattr(e, "message", "") or st._first_line(e))


def _nlist(n: int) -> int:
    """IVF lists for n rows: the rule FAISS IVF indexes here use (tuning.factory_for)."""
    return int(st.factory_for("ivf", n)[3:].split(",")[0])


# -- export -------------------------------------------------------------------------------


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
                raise IndexStateError(f"{folder / VECTORS}: not every row was written; resume")
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
    except _pymilvus().exceptions.MilvusException as e:
        raise MilvusError(f"Milvus at {uri}: {_message(e)}") from None
    finally:
        client.close()


def _create(client: Any, coll: str, dim: int, ids: np.ndarray, meta: dict[str, Any]) -> None:
    dt = _pymilvus().DataType
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
    per_chunk = max(1, min(10_000, _REQUEST_BYTES // (4 * store.dim)))
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
        meta["nlist"] = _nlist(meta["rows"])  # as requested; Milvus Lite 3.2 ignores it (128)
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
        res = _search(client, coll, meta, qs, k, nprobe)
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
    ladder = [p for p in st._NPROBE_GRID if p < meta["nlist"]]
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


# -- search -------------------------------------------------------------------------------


def _search(
    client: Any, coll: str, meta: dict[str, Any], q: np.ndarray, k: int, nprobe: int | None
) -> SearchResult:
    """Top-k of q [B, D] in one collection, scores as inner products, rows = store rows."""
    params: dict[str, Any] = {"metric_type": meta["metric"]}
    if meta["kind"] == "ivf":
        params["params"] = {"nprobe": int(nprobe or meta["nprobe"])}
    b = len(q)
    scores = np.full((b, k), -np.inf, dtype=np.float32)
    rows = np.full((b, k), -1, dtype=np.int64)
    ids: list[list[Any]] = [[None] * k for _ in range(b)]
    qnorm = np.linalg.norm(q, axis=1)  # [B]
    per_call = max(1, min(1024, _REQUEST_BYTES // (4 * q.shape[1])))
    for i0 in range(0, b, per_call):
        hits = client.search(
            coll,
            data=list(q[i0 : i0 + per_call]),
            limit=k,
            anns_field="vector",
            search_params=params,
            output_fields=["sample_id", "norm"],
        )
        for i, row_hits in enumerate(hits, start=i0):
            for j, h in enumerate(row_hits):
                d = float(h.distance)
                if meta["metric"] == "COSINE":  # back to the inner product FAISS returns
                    d *= float(qnorm[i]) * float(h["entity"]["norm"])
                scores[i, j], rows[i, j], ids[i][j] = d, h.id, h["entity"]["sample_id"]
    order = np.lexsort((rows, -scores), axis=-1)  # best first, ties by row number
    ids_arr = np.array(ids, dtype=object)
    return SearchResult(
        scores=np.take_along_axis(scores, order, 1),
        ids=np.take_along_axis(ids_arr, order, 1),
        rows=np.take_along_axis(rows, order, 1),
    )


class MilvusBackend:
    """Both methods' collections of one exported index, searched like ``VectorIndex``."""

    def __init__(self, client: Any, uri: str, name: str, meta: dict[str, dict[str, Any]]) -> None:
        """Use :meth:`connect`."""
        self._client = client
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
            if isinstance(e, _pymilvus().exceptions.MilvusException):
                raise MilvusError(f"Milvus at {uri}: {_message(e)}") from None
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

    def search(self, queries: np.ndarray, k: int, method: str, exact: bool = False) -> SearchResult:
        """Top-k rows for each query [B, D], best first: scores are inner products (as FAISS),
        rows the row numbers in vectors.h5, ids the training-sample ids. ``exact`` searches
        every IVF list (nprobe = 65536, Milvus's largest; a FLAT collection is always exact)."""
        if method not in METHODS:
            raise SearchError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
        rec = self.meta[method]
        q = _as_matrix(queries, "queries", self.dim)
        k = check_k(k, rec["rows"])
        if k > MAX_TOPK:
            raise SearchError(f"k={k}: Milvus returns at most {MAX_TOPK} results per query")
        coll = collection_name(self.name, method)
        nprobe = MAX_NPROBE if exact else None
        pm = _pymilvus()
        try:
            res = _search(self._client, coll, rec, q, k, nprobe)
            short = np.flatnonzero((res.rows < 0).any(axis=1))
            if short.size and rec["kind"] == "ivf" and not exact:  # as VectorIndex: exact instead
                redo = _search(self._client, coll, rec, q[short], k, MAX_NPROBE)
                for name in ("scores", "ids", "rows"):
                    getattr(res, name)[short] = getattr(redo, name)
        except pm.exceptions.MilvusException as e:
            raise MilvusError(f"Milvus at {self.uri}: {_message(e)}") from None
        return res

    def close(self) -> None:
        self._client.close()

    def __repr__(self) -> str:
        return f"MilvusBackend({self.uri!r}, name={self.name!r})"
