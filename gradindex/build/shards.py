"""Sharded builds and the pieces merge and add share.

- ``merge_shards(out, shard_dirs)`` -- checks the shards share spec, checkpoints and model and
  cover the dataset exactly once, then concatenates their rows in dataset order into a new
  index folder with both search indexes (``gradindex merge``). Which rows a shard holds:
  ``gradindex.inputs.slices``.
- ``assemble`` -- copy the rows of finished index folders into a staging folder beside the
  target, build the search indexes, write the manifest last; the folder is then swapped in whole
  (``gradindex.store.lifecycle``).

A shard is an ordinary finished index folder over its rows (searchable on its own, with an exact
index); its manifest's ``shard`` record says which rows it holds and which index kind the merged
index should get.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from gradindex.errors import IndexStateError
from gradindex.query import AttributionIndex
from gradindex.search.faiss_index import METHODS
from gradindex.search.kernel_recall import with_search_record
from gradindex.search.ondisk import build_from_store
from gradindex.search.tuning import check_kind
from gradindex.spec import NOT_IDENTITY, OMITTED_AT_DEFAULT
from gradindex.store.kernel import merge_kernels
from gradindex.store.layout import (
    FORMAT_VERSION,
    MANIFEST,
    VECTORS,
    check_files,
    faiss_file,
    file_records,
    package_versions,
    read_manifest,
    write_json_atomic,
)
from gradindex.store.lifecycle import check_target, folder_lock, staging_folder, swap_in
from gradindex.store.vectors import VectorStore

logger = logging.getLogger(__name__)

# manifest keys every part of one index must agree on, with how to name them in an error
SAME_KEYS = {
    "spec_fingerprint": "spec",
    "format_version": "format version",
    "dim": "dimension",
    "sample_shape": "sample shape",
    "prediction_type": "prediction type",
    "num_params": "parameter count",
}
COPY_ROWS = 8192  # rows per copy step: bounded memory whatever the index size


# -- merge ------------------------------------------------------------------------------


def merge_shards(
    out: str | os.PathLike[str],
    shard_dirs: list[str | os.PathLike[str]],
    *,
    index: str | None = None,
    target_recall: float | None = None,
    overwrite: bool = False,
) -> Any:
    """Merge finished shard folders (from ``build --shard i/n``) into one index at ``out``.

    index / target_recall: the search index kind of the merged index; default: what the shard
    builds were asked for. Returns the opened ``AttributionIndex``.
    """
    started = time.perf_counter()
    out = Path(out).resolve()  # a link or '.' names the real folder: one lock, one swap
    if not shard_dirs:
        raise IndexStateError("no shard folders given; pass every folder written by build --shard")
    if any(Path(d).resolve() == out.resolve() for d in shard_dirs):
        raise IndexStateError(f"{out}: is also one of the shards; merge into another folder")
    parts = [(Path(d), open_part(Path(d))) for d in shard_dirs]
    for path, m in parts:
        if "shard" not in m:
            raise IndexStateError(
                f"{path}: a finished index but not a shard (built without --shard); "
                "merge takes the folders of 'gradindex build --shard i/n'"
            )
    check_same(parts)
    parts.sort(key=lambda p: p[1]["shard"]["start"])
    _check_coverage(parts)
    first = parts[0][1]["shard"]
    kind = index or first.get("merge_index", "flat")
    recall = target_recall if target_recall is not None else first.get("merge_target_recall", 0.95)
    check_kind(kind, parts[0][1]["dim"], recall)  # before any row is copied

    with folder_lock(out, "choose an --out in a writable folder"):
        check_target(out, overwrite)
        base = {k: v for k, v in parts[0][1].items() if k not in ("shard", "data_seconds")}
        extra = {
            "merged_from": [
                {"path": str(p.resolve()), "start": m["shard"]["start"], "stop": m["shard"]["stop"]}
                for p, m in parts
            ],
            "build_seconds": round(sum(m.get("build_seconds") or 0 for _, m in parts), 3),
        }
        fidelity = parts[0][1].get("fidelity")
        if fidelity and "skipped" not in fidelity:  # same projection: its sample still speaks
            extra["fidelity"] = {**fidelity, "measured_on": f"rows {first['start']}-"
                                 f"{first['stop'] - 1} (the first shard's)"}  # fmt: skip
        stage = staging_folder(out)
        assemble(stage, [p for p, _ in parts], base, kind, recall, extra, started)
        swap_in(stage, out)
    return AttributionIndex.open(out)


def open_part(folder: Path) -> dict[str, Any]:
    """The manifest of a finished index whose files are all present at their recorded sizes."""
    manifest = read_manifest(folder)
    problems = check_files(folder, manifest, checksums=False)
    if problems:
        raise IndexStateError(f"{problems[0]}; rebuild that index")
    with VectorStore.open(folder / VECTORS) as store:
        store.check_manifest(manifest)  # another build's vectors.h5 is not this index's rows
    return manifest


def check_same(parts: list[tuple[Path, dict[str, Any]]]) -> None:
    """Refuse parts built with another spec, other checkpoints or another model, by name."""
    (p0, m0), rest = parts[0], parts[1:]
    fp0 = [c["fingerprint"] for c in m0["checkpoints"]]
    for path, m in rest:
        for key, what in SAME_KEYS.items():
            if m.get(key) != m0.get(key):
                detail, fix = "", "build every part with the same settings"
                if key == "spec_fingerprint":
                    detail, fix = _spec_diff(m0, m, path) or (detail, fix)
                raise IndexStateError(f"{path}: {what} differs from {p0}{detail}; {fix}")
        fp = [c["fingerprint"] for c in m["checkpoints"]]
        if fp != fp0:
            raise IndexStateError(
                f"{path}: checkpoint fingerprints differ from {p0} (other weights or another "
                "model); build every part from the same checkpoints"
            )
        pairs = zip(m["checkpoints"], m0["checkpoints"], strict=True)
        if any(
            a.get("config") and b.get("config") and a["config"] != b["config"] for a, b in pairs
        ):
            raise IndexStateError(
                f"{path}: checkpoint configs differ from {p0} (a config.json or "
                "scheduler_config.json edited between the builds); build every part from the "
                "same checkpoint folders"
            )
        if m.get("shard", {}).get("total_rows") != m0.get("shard", {}).get("total_rows"):
            raise IndexStateError(
                f"{path}: sharded a dataset of {m['shard']['total_rows']} rows but {p0} one of "
                f"{m0['shard']['total_rows']}; shard the same dataset"
            )
    _check_same_data(parts)


def _spec_diff(m0: dict[str, Any], m: dict[str, Any], path: Path) -> tuple[str, str] | None:
    """The spec fields two parts differ in, with their values, and how to fix it: a field
    'auto' decided on each part's machine (e.g. bfloat16 units on one only) is pinned to the
    first part's value for a rebuild of the other."""
    a, b = ({**OMITTED_AT_DEFAULT, **x["spec"]} for x in (m0, m))
    diff = sorted(k for k in a if b.get(k) != a[k] and k not in NOT_IDENTITY)
    if not diff:
        return None
    detail = f" ({', '.join(f'spec.{k} {b.get(k)!r} vs {a[k]!r}' for k in diff)})"
    decided = {f for x in (m0, m) for f in (x.get("auto") or {}).get("asked", ())}
    if not decided or not set(diff) <= decided:
        return detail, "build every part with the same settings"
    pins = " ".join(f"--{k} {a[k]}" for k in diff)
    return detail, (
        f"'auto' decided {', '.join(diff)} otherwise on the machines that built them; "
        f"rebuild {path} with {pins} (or every part with the same pinned values)"
    )


def _check_same_data(parts: list[tuple[Path, dict[str, Any]]]) -> None:
    """Shards cut from other data, or from the same data in another order, would put ids on
    other samples' rows: refused by their data digests (``gradindex.inputs.slices``); shards
    built before the digest was recorded cannot be checked, and a warning says so."""
    digests = [(p, (m.get("shard") or {}).get("data_digest")) for p, m in parts]
    if any(d is None for _, d in digests):
        old = ", ".join(str(p) for p, d in digests if d is None)
        logger.warning(
            "%s: built before shards recorded a digest of their data; merge cannot check that "
            "every shard was cut from the same data in the same order",
            old,
        )
        return
    (p0, d0), *rest = digests
    for path, digest in rest:
        if digest != d0:
            raise IndexStateError(
                f"{path}: was cut from other data than {p0}, or from the same data in another "
                "order (their data digests differ); build every shard from the same data, in "
                "the same order"
            )


def _check_coverage(parts: list[tuple[Path, dict[str, Any]]]) -> None:
    """Shards sorted by start must tile [0, total_rows) exactly once."""
    total = parts[0][1]["shard"]["total_rows"]
    pos = 0
    for path, m in parts:
        s = m["shard"]
        if s["start"] > pos:
            raise IndexStateError(
                f"rows {pos}..{s['start'] - 1} of {total} are in no shard given; pass every "
                f"shard ({s['count']} were made)"
            )
        if s["start"] < pos:
            raise IndexStateError(
                f"{path}: rows {s['start']}..{s['stop'] - 1} overlap another shard given; "
                "pass each shard once, all from the same --shard i/n split"
            )
        pos = s["stop"]
    if pos != total:
        raise IndexStateError(
            f"rows {pos}..{total - 1} of {total} are in no shard given; pass every shard"
        )


# -- shared by build, merge and add ----------------------------------------------------------


def assemble(
    stage: Path,
    sources: list[Path],
    base_manifest: dict[str, Any],
    kind: str,
    target_recall: float,
    extra: dict[str, Any],
    started: float,
) -> dict[str, Any]:
    """Write the rows of the finished index folders ``sources``, in order, into a new index at
    ``stage``: vectors.h5, both search indexes, and the manifest last. Returns the manifest."""
    stores = [VectorStore.open(p / VECTORS) for p in sources]
    try:
        ids = concat_ids([s.ids for s in stores], sources)
        first = stores[0].file
        stage.mkdir(parents=True)
        attrs = {k: plain_value(first.attrs[k]) for k in first.attrs}
        out = VectorStore.create(
            stage / VECTORS,
            ids,
            stores[0].dim,
            first["norms"].shape[1],
            first["norms"].shape[2],
            str(first["tracin"].dtype),
            attrs,
        )
        with out:
            blocks = _extra_columns(out, stores, sources)
            offset = 0
            for src in stores:
                f = src.file
                for a in range(0, src.num_rows, COPY_ROWS):
                    b = min(a + COPY_ROWS, src.num_rows)
                    for name in blocks:  # before write_rows, which flushes and marks done
                        out.write_column(name, offset + a, f[name][a:b])
                    out.write_rows(
                        offset + a,
                        f["tracin"][a:b],
                        f["retrac"][a:b],
                        f["norms"][a:b],
                        f["flagged"][a:b],
                    )
                offset += src.num_rows
            flagged, build_id = out.flagged, out.build_id  # a new id: another build
            keep = np.flatnonzero(~flagged)
            index_info = {}
            for method in METHODS:  # in RAM, or on disk in chunks (gradindex.search.ondisk)
                index_info[method] = build_from_store(
                    out, method, keep, kind, target_recall, stage / faiss_file(method)
                )
    finally:
        for s in stores:
            s.close()
    weights = [c["weight"] for c in base_manifest["checkpoints"]]
    kernel = merge_kernels(stage, weights, build_id)  # one pass over the assembled rows
    kernel = with_search_record(
        stage, {**base_manifest, "kernel": kernel, "indexes": index_info, "build_id": build_id,
                "num_rows": len(ids)}
    )  # fmt: skip
    manifest = {
        **base_manifest,
        **extra,
        "complete": True,
        "format_version": FORMAT_VERSION,
        "build_id": build_id,
        "num_rows": len(ids),
        "num_flagged": int(flagged.sum()),
        "indexes": index_info,
        "kernel": kernel,
        "factors": None,  # influence factors are not merged: 'gradindex factors' recomputes them
        "versions": package_versions(),
        "files": file_records(stage),
        "assemble_seconds": round(time.perf_counter() - started, 3),
    }
    write_json_atomic(stage / MANIFEST, manifest)
    return manifest


def _extra_columns(out: VectorStore, stores: list[VectorStore], sources: list[Path]) -> list[str]:
    """Copy the row-aligned extra datasets (conditioning labels / prompts) of every part into
    ``out`` whole; preallocate the multi-dimensional ones (latents) and return their names, to
    be copied row block by row block."""
    core = {"ids", *METHODS, "norms", "done", "flagged"}
    names = [n for n in stores[0].file if n not in core]
    blocks = []
    for name in names:
        for src, path in zip(stores, sources, strict=True):
            if name not in src.file:
                raise IndexStateError(
                    f"{path}: has no '{name}' dataset but {sources[0]} has; the parts were "
                    "built differently"
                )
        ds = stores[0].file[name]
        if ds.ndim > 1:
            out.add_column(name, shape=tuple(ds.shape[1:]))
            blocks.append(name)
        else:
            out.add_column(name, np.concatenate([s.column(name) for s in stores]))
    return blocks


def plain_value(value: Any) -> Any:
    """An HDF5 attribute (numpy scalar or str) as a plain Python value."""
    return value.item() if isinstance(value, np.generic) else value


def concat_ids(parts: list[np.ndarray], sources: list[Path]) -> np.ndarray:
    """The ids of every part in order; refused if kinds differ or any id repeats."""
    kinds = {"int" if p.dtype.kind in "iu" else "str" for p in parts}
    if len(kinds) > 1:
        raise IndexStateError(
            "the parts mix integer and string ids; give every part ids of one kind"
        )
    ids = np.concatenate(parts)
    uniq, counts = np.unique(ids, return_counts=True)
    if len(uniq) != len(ids):
        dup = uniq[counts > 1]
        where = [str(s) for s, p in zip(sources, parts, strict=True) if np.isin(dup[:1], p).any()]
        raise IndexStateError(
            f"{len(dup)} id(s) occur in more than one part (first: {plain_value(dup[0])!r}, in "
            f"{' and '.join(where)}); give every sample its own id"
        )
    return ids
