"""The on-disk layout of an index folder and its manifest.

Holds the file names, the format version, the package versions stamped into every manifest,
and atomic JSON writing. One folder per index:

    manifest.json    spec, versions, checkpoint fingerprints, counts, search settings;
                     written last: its presence with "complete": true marks a finished build
    vectors.h5       ids, tracin / retrac rows, per-draw norms, done / flagged masks
    tracin.faiss     inner-product index over the TracIn rows (+ .json sidecar)
    retrac.faiss     inner-product (= cosine) index over the ReTrac rows (+ .json sidecar)
    *.faiss.ivfdata  the inverted lists of an on-disk index (kind "ondisk"), memory-mapped
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

from gradindex.errors import IndexStateError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
VECTORS = "vectors.h5"
BUILD_STATE = "build.json"  # written at the start of a build, removed when it completes


def faiss_file(method: str) -> str:
    return f"{method}.faiss"


def package_versions() -> dict[str, str]:
    out = {}
    for name in ("gradindex", "torch", "diffusers", "faiss-cpu", "numpy", "h5py"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, sort_keys=True, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest of a finished index, or an error that says what is wrong with the folder."""
    if not folder.exists():
        raise IndexStateError(f"{folder}: no such index folder")
    if not folder.is_dir():
        raise IndexStateError(
            f"{folder}: not a folder; an index is a folder made by 'gradindex build'"
        )
    mpath = folder / MANIFEST
    if not mpath.exists():
        if (folder / BUILD_STATE).exists() or (folder / VECTORS).exists():
            raise IndexStateError(
                f"{folder}: incomplete index (its build did not finish); "
                "run the same build again with --resume to finish it"
            )
        raise IndexStateError(f"{folder}: not a gradindex index (no {MANIFEST})")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise IndexStateError(f"{mpath}: corrupted manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("complete") is not True:
        raise IndexStateError(f"{mpath}: index is not marked complete; rebuild or resume it")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise IndexStateError(
            f"{folder}: index format version {version} but this gradindex reads version "
            f"{FORMAT_VERSION}; rebuild the index with this version"
        )
    return manifest


def index_files(folder: Path) -> list[str]:
    """Every data file of a finished index other than the manifest, in a fixed order."""
    names = [VECTORS]
    for method in ("tracin", "retrac"):
        names += [faiss_file(method), faiss_file(method) + ".json"]
        names += [faiss_file(method) + ".ivfdata"]  # on-disk indexes only
    return [n for n in names if (folder / n).exists()]


def file_digest(path: Path, chunk: int = 1 << 22) -> str:
    """sha256 of a file's bytes, read in 4 MiB pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_records(folder: Path) -> dict[str, dict[str, Any]]:
    """{name: {"bytes", "sha256"}} for the manifest."""
    return {
        name: {"bytes": (folder / name).stat().st_size, "sha256": file_digest(folder / name)}
        for name in index_files(folder)
    }


def check_files(folder: Path, manifest: dict[str, Any], *, checksums: bool) -> list[str]:
    """Problems with the index's files, one line each naming the file: missing, wrong size
    (truncated or grown), and with ``checksums`` a content mismatch (flipped bytes)."""
    problems = []
    for name, rec in manifest.get("files", {}).items():
        path = folder / name
        if not path.exists():
            problems.append(f"{path}: missing")
        elif path.stat().st_size != rec["bytes"]:
            problems.append(
                f"{path}: {path.stat().st_size} bytes, expected {rec['bytes']} (truncated or altered)"
            )
        elif checksums and file_digest(path) != rec["sha256"]:
            problems.append(f"{path}: checksum mismatch (file corrupted)")
    return problems
