"""Talking to Milvus: the client, collection names, the export record's keys, one search.

Shared by :mod:`gradindex.search.milvus_export` (writing collections) and
:mod:`gradindex.search.milvus` (the search backend); see the latter for metrics and layout.
pymilvus is imported only when a function here talks to Milvus.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from gradindex.errors import MilvusError
from gradindex.search import tuning as st
from gradindex.search.backend import SearchResult
from gradindex.search.faiss_common import first_line

MILVUS_KINDS = ("flat", "ivf")
METRICS = {"tracin": "IP", "retrac": "COSINE"}
META_KEY = "gradindex"  # collection property holding the export record (JSON)
MAX_TOPK = 16384  # Milvus's limit on k (and on queries per request)
MAX_NPROBE = 65536  # Milvus's limits on nlist and nprobe: this nprobe scans every IVF list
REQUEST_BYTES = 16 << 20  # rows per insert / queries per search kept under this (gRPC: 64 MiB)
INSTALL = 'the Milvus backend needs pymilvus: pip install "gradindex[milvus]"'


def pymilvus_module() -> Any:
    """The pymilvus module, or MilvusError saying how to install it."""
    try:
        import pymilvus
    except ImportError:
        raise MilvusError(INSTALL) from None
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
    pm = pymilvus_module()
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
        raise MilvusError(f"cannot connect to Milvus at {uri}: {message(e)}") from None


def message(e: Exception) -> str:
    """A Milvus error's own message, else its last line."""
    return str(getattr(e, "message", "") or first_line(e))


def nlist_for(n: int) -> int:
    """IVF lists for n rows: the rule FAISS IVF indexes here use (tuning.factory_for)."""
    return int(st.factory_for("ivf", n)[3:].split(",")[0])


def search_collection(
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
    per_call = max(1, min(1024, REQUEST_BYTES // (4 * q.shape[1])))
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
