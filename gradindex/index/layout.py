"""The on-disk layout of an index folder and its manifest.

Holds the file names, the format version, the package versions stamped into every manifest,
and atomic JSON writing. One folder per index:

    manifest.json    spec, versions, checkpoint fingerprints, counts, search settings;
                     written last: its presence with "complete": true marks a finished build
    vectors.h5       ids, tracin / retrac rows, per-draw norms, done / flagged masks
    tracin.faiss     inner-product index over the TracIn rows (+ .json sidecar)
    retrac.faiss     inner-product (= cosine) index over the ReTrac rows (+ .json sidecar)
    *.faiss.ivfdata  the inverted lists of an on-disk index (kind "ondisk"), memory-mapped
    kernel.h5        per-checkpoint Gram G_c [C, d, d] float64 of the TracIn rows ('trak')
    factors.h5       EK-FAC factors per layer and checkpoint ('influence'), when computed
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import tempfile
import uuid
from importlib import metadata
from pathlib import Path
from typing import Any

from gradindex.errors import IndexStateError, SpecError
from gradindex.spec import BuildSpec

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
VECTORS = "vectors.h5"
KERNEL = "kernel.h5"  # per-checkpoint Gram of the TracIn rows (gradindex.index.kernel)
FACTORS = "factors.h5"  # EK-FAC factors of method 'influence' (gradindex.index.factors)
BUILD_STATE = "build.json"  # written at the start of a build, removed when it completes


def faiss_file(method: str) -> str:
    return f"{method}.faiss"


# every data file an index folder may hold besides the manifest, in a fixed order; a manifest
# naming any other file is refused (it could make open / verify read a file outside the index)
DATA_FILES: tuple[str, ...] = (
    VECTORS,
    *(
        faiss_file(m) + suffix
        for m in ("tracin", "retrac")
        for suffix in ("", ".json", ".ivfdata")  # .ivfdata: on-disk indexes only
    ),
    KERNEL,
    FACTORS,
)


def new_build_id() -> str:
    """A random id written both into ``vectors.h5`` and into the manifest (and the FAISS
    sidecars) of one build, so files of two builds are never taken for one index."""
    return uuid.uuid4().hex


def package_versions() -> dict[str, str]:
    out = {}
    for name in ("gradindex", "torch", "diffusers", "faiss-cpu", "numpy", "h5py"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def _umask() -> int:
    """The process umask (read from /proc where it can be, without changing it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``.

    The file gets the mode an ordinary ``open(path, "w")`` would (0666 less the umask), not
    mkstemp's 0600: an index built by one user must be readable by the others it is shared with.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, sort_keys=True, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def lock_file(target: Path) -> Path:
    """The lock file a writer of the index folder ``target`` holds (beside the folder)."""
    return target.parent / f".{target.name}.lock"


def lock_holder(folder: Path) -> str | None:
    """The pid ("?" if unreadable) of a process writing ``folder`` now, else None."""
    path = lock_file(folder.resolve())
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return os.read(fd, 32).decode(errors="replace").strip() or "?"
    except OSError:
        return None
    finally:
        os.close(fd)  # closing releases a shared lock taken here
    return None


def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest of a finished index, or an error that says what is wrong with the folder."""
    if not folder.exists():
        raise IndexStateError(f"{folder}: no such index folder")
    if not folder.is_dir():
        raise IndexStateError(
            f"{folder}: not a folder; an index is a folder made by 'gradindex build'"
        )
    mpath = _inside(folder, MANIFEST)
    if not mpath.exists():
        holder = lock_holder(folder)
        if holder is not None:
            raise IndexStateError(
                f"{folder}: another gradindex process (pid {holder}) is building this index; "
                "wait for it to finish"
            )
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
    check_spec(mpath, manifest)
    return manifest


def check_spec(mpath: Path, manifest: dict[str, Any]) -> None:
    """The manifest's spec must parse and match the fingerprint recorded beside it at build
    time: a spec edited by hand would embed queries unlike the stored rows."""
    try:
        spec = BuildSpec.from_dict(manifest["spec"])
    except (SpecError, KeyError, TypeError) as exc:
        raise IndexStateError(f"{mpath}: unreadable spec ({exc}); rebuild the index") from None
    recorded = manifest.get("spec_fingerprint")
    if recorded not in spec.fingerprints():
        raise IndexStateError(
            f"{mpath}: spec has fingerprint {spec.fingerprint()} but the build recorded "
            f"{recorded} (the spec was edited); restore the manifest or rebuild the index"
        )


def index_files(folder: Path) -> list[str]:
    """Every data file of a finished index other than the manifest, in a fixed order."""
    return [n for n in DATA_FILES if (folder / n).exists()]


def _inside(folder: Path, name: str) -> Path:
    """``folder / name`` for a known file name whose real location is inside ``folder``
    (a symlink pointing out of the folder is refused: nothing outside an index is read)."""
    if name != MANIFEST and name not in DATA_FILES:
        raise IndexStateError(
            f"{folder / MANIFEST}: names the file {name!r}, which is no file of an index "
            f"(known: {', '.join(DATA_FILES)}); the manifest was altered: rebuild the index"
        )
    path = folder / name
    real, home = path.resolve(), folder.resolve()
    if path.is_symlink() and real.parent != home:
        raise IndexStateError(
            f"{path}: a link to {real}, outside the index folder; copy the file into the folder"
        )
    return path


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
    files = manifest.get("files", {})
    if not isinstance(files, dict):
        raise IndexStateError(f"{folder / MANIFEST}: 'files' is not a mapping; rebuild the index")
    for name in index_files(folder):  # the files open reads, listed or not
        _inside(folder, name)
    problems = []
    for name, rec in files.items():
        path = _inside(folder, name)
        if not isinstance(rec, dict) or not isinstance(rec.get("bytes"), int):
            problems.append(f"{path}: no size recorded in the manifest")
        elif not path.exists():
            problems.append(f"{path}: missing")
        elif path.stat().st_size != rec["bytes"]:
            problems.append(
                f"{path}: {path.stat().st_size} bytes, expected {rec['bytes']} (truncated or altered)"
            )
        elif checksums and file_digest(path) != rec.get("sha256"):
            problems.append(f"{path}: checksum mismatch (file corrupted)")
    return problems
