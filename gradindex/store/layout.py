"""The on-disk layout of an index folder and its manifest.

Holds the file names, the format version, the package versions stamped into every manifest,
and atomic JSON writing. One folder per index:

    manifest.json    spec, versions, checkpoint fingerprints, counts, search settings;
                     written last: its presence with "complete": true marks a finished build
    vectors.h5       ids, tracin / retrac rows, per-draw norms, done / flagged masks
    tracin.faiss     inner-product index over the TracIn rows (+ .json sidecar)
    retrac.faiss     inner-product (= cosine) index over the ReTrac rows (+ .json sidecar)
    *.faiss.ivfdata  the inverted lists of an on-disk index (kind "ondisk"), memory-mapped
    kernel.h5        eigen factors of the per-checkpoint Grams of both row sets ('trak', 'retrak')
    factors.h5       EK-FAC factors per layer and checkpoint ('influence'), when computed
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import stat
import tempfile
import uuid
from importlib import metadata
from pathlib import Path
from typing import Any

from gradindex.errors import IndexStateError, SpecError
from gradindex.spec import METHODS, BuildSpec
from gradindex.store.columns import column_digests

FORMAT_VERSION = 1
"""The index folder's format: stamped in the manifest, each FAISS sidecar and the Milvus export
record, and checked when any of them is read (``kernel.h5`` has its own, ``kernel.FORMAT``)."""
MANIFEST = "manifest.json"
VECTORS = "vectors.h5"
KERNEL = "kernel.h5"  # the kernel methods' factors (gradindex.store.kernel)
FACTORS = "factors.h5"  # EK-FAC factors of method 'influence' (gradindex.store.factors)
BUILD_STATE = "build.json"  # written at the start of a build, removed when it completes


def faiss_file(method: str) -> str:
    return f"{method}.faiss"


# every data file an index folder may hold besides the manifest, in a fixed order; a manifest
# naming any other file is refused (it could make open / verify read a file outside the index)
DATA_FILES: tuple[str, ...] = (
    VECTORS,
    *(
        faiss_file(m) + suffix
        for m in METHODS
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
        if (folder / BUILD_STATE).exists():
            raise IndexStateError(
                f"{folder}: incomplete index (its build did not finish); "
                "run the same build again with --resume to finish it"
            )
        if (folder / VECTORS).exists():
            raise IndexStateError(lost_manifest(folder))
        raise IndexStateError(f"{folder}: not a gradindex index (no {MANIFEST})")
    regular_file(mpath)  # a named pipe would block the read forever
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
    check_numbers(mpath, manifest)
    return manifest


COUNTS = ("num_rows", "dim", "proj_dim", "num_params", "num_flagged")
MAX_COUNT = 1 << 48  # rows, dimensions, parameters: far above any real index
MAX_SIDE = 1 << 15  # pixels per side of a model's image (a 32768 x 32768 image)


def show_value(value: Any) -> str:
    """A manifest value for a message, at most a few dozen characters (no 30-digit numbers,
    lists cut after four items)."""
    if isinstance(value, list):
        more = ", ..." if len(value) > 4 else ""
        return "[" + ", ".join(show_value(v) for v in value[:4]) + more + "]"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**12:
        return f"{value:.3g}"
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _count(value: Any, lo: int = 0, hi: int = MAX_COUNT) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi


def check_numbers(mpath: Path, manifest: dict[str, Any]) -> None:
    """Every count and shape the manifest declares must be a plausible integer, and ``dim``
    = checkpoints x ``proj_dim``, before anything is allocated from them (an edited
    ``image_shape`` of [1, 1e5, 1e5] made a query allocate 320 GB); the store then checks the
    counts against its datasets, a query the shapes against the model."""
    altered = "the manifest was altered: restore it or rebuild the index"
    for key in COUNTS:
        value = manifest.get(key, 0 if key == "num_flagged" else None)
        if not _count(value):
            raise IndexStateError(f"{mpath}: {key} is {show_value(value)}, not a count; {altered}")
    for key in ("sample_shape", "image_shape"):
        value = manifest.get(key, manifest.get("sample_shape"))
        if not (
            isinstance(value, list)
            and len(value) == 3
            and all(_count(v, 1, MAX_SIDE) for v in value)
        ):
            raise IndexStateError(
                f"{mpath}: {key} is {show_value(value)}, not [channels, height, width] of at most "
                f"{MAX_SIDE} each; {altered}"
            )
    ckpts = manifest.get("checkpoints")
    if isinstance(ckpts, list) and manifest["dim"] != manifest["proj_dim"] * len(ckpts):
        raise IndexStateError(
            f"{mpath}: dim {show_value(manifest['dim'])} is not {len(ckpts)} checkpoint(s) x "
            f"proj_dim {show_value(manifest['proj_dim'])}; {altered}"
        )


def regular_file(path: Path) -> None:
    """Refuse a path that is no regular file once links are followed: a symlink loop, a named
    pipe (reading it blocks forever), a device or a folder."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise IndexStateError(
                f"{path}: a symlink loop; put the index's own file in its place"
            ) from None
        if exc.errno == errno.ENOENT:
            return  # missing files are named by the caller, which knows what is needed
        raise IndexStateError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    if not stat.S_ISREG(mode):
        kind = (
            "a folder"
            if stat.S_ISDIR(mode)
            else "a named pipe"
            if stat.S_ISFIFO(mode)
            else ("a special file")
        )
        raise IndexStateError(f"{path}: {kind}, not a regular file; put the index's own file there")


def lost_manifest(folder: Path) -> str:
    """What to say of a folder with an index's files but neither a manifest nor the record of
    an unfinished build (a finished index whose manifest.json was deleted): --resume cannot
    tell what built the rows, --overwrite rebuilds in its place."""
    return (
        f"{folder}: holds an index's files but no {MANIFEST} (deleted?); restore it from a "
        "backup, or rebuild in its place: the same 'gradindex build' with --overwrite"
    )


def check_spec(mpath: Path, manifest: dict[str, Any]) -> None:
    """The manifest's spec must parse and match the fingerprint recorded beside it at build
    time: a spec edited by hand would embed queries unlike the stored rows."""
    try:
        spec = BuildSpec.from_stored(manifest["spec"])
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
    regular_file(path)  # before resolve(), which raises RuntimeError on a loop
    real, home = path.resolve(), folder.resolve()
    if path.is_symlink() and real.parent != home:
        raise IndexStateError(
            f"{path}: a link to {real}, outside the index folder; copy the file into the folder"
        )
    return path


def file_digest(path: Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes, read in 1 MiB pieces (a bounded allocation at any file size)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_records(folder: Path) -> dict[str, dict[str, Any]]:
    """{name: {"bytes", "sha256"}} for the manifest; ``vectors.h5``'s adds "ids_sha256", a
    digest per block of ids that a query checks as it reads them (``LazyColumn``)."""
    records: dict[str, dict[str, Any]] = {
        name: {"bytes": (folder / name).stat().st_size, "sha256": file_digest(folder / name)}
        for name in index_files(folder)
    }
    if VECTORS in records:
        records[VECTORS]["ids_sha256"] = column_digests(folder / VECTORS, "ids")
    return records


RESTORE = "restore the index's own file or rebuild the index"
"""What to do about a damaged file that only a build writes."""


def recorded_digest(folder: Path, manifest: dict[str, Any], name: str, fix: str = RESTORE) -> None:
    """Refuse a file whose sha256 differs from the manifest's record of it (a file that the
    answer of every query relies on, checked when it is loaded); no record: nothing to check."""
    rec = manifest.get("files", {}).get(name)
    if isinstance(rec, dict) and "sha256" in rec and file_digest(folder / name) != rec["sha256"]:
        raise IndexStateError(
            f"{folder / name}: its checksum differs from the manifest's (the file was altered "
            f"or corrupted); {fix}"
        )


def check_build_id(path: Path, build_id: str, manifest: dict[str, Any], fix: str) -> None:
    """Refuse a file (kernel.h5, factors.h5) stamped with another build's id than the
    manifest's: computed from other rows, it would answer for them."""
    if manifest.get("build_id") and build_id != manifest["build_id"]:
        raise IndexStateError(
            f"{path}: build id {build_id} but the manifest's is {manifest['build_id']} (a file "
            f"of another build); {fix}"
        )


def ids_digests(folder: Path, manifest: dict[str, Any]) -> list[str] | None:
    """The manifest's digests of ``vectors.h5``'s ids (None for indexes built before them)."""
    digests = manifest.get("files", {}).get(VECTORS, {}).get("ids_sha256")
    if digests is not None and not (
        isinstance(digests, list) and all(isinstance(d, str) for d in digests)
    ):
        raise IndexStateError(f"{folder / MANIFEST}: unreadable ids digests; rebuild the index")
    return digests


REPAIRS = {
    KERNEL: "recompute it with: gradindex kernel {folder}",
    FACTORS: "compute them with: gradindex factors {folder} --data TRAINING_DATA",
}
"""The files a command rewrites from the rows in seconds, and that command (not a rebuild)."""


def check_files(
    folder: Path,
    manifest: dict[str, Any],
    *,
    checksums: bool,
    skip: tuple[str, ...] = (),
    fix: str = "",
) -> list[str]:
    """Problems with the index's files, one line each naming the file: missing, wrong size
    (truncated or grown), and with ``checksums`` a content mismatch (flipped bytes); the
    files named in ``skip`` are left to whoever reads them. Each problem ends with the
    command that rewrites the file, or ``fix``."""
    files = manifest.get("files", {})
    if not isinstance(files, dict):
        raise IndexStateError(f"{folder / MANIFEST}: 'files' is not a mapping; rebuild the index")
    for name in index_files(folder):  # the files open reads, listed or not
        _inside(folder, name)
    problems = []
    for name, rec in files.items():
        path = _inside(folder, name)
        if name in skip:
            continue
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
        repair = REPAIRS[name].format(folder=folder) if name in REPAIRS else fix
        if repair and problems and problems[-1].startswith(str(path)):
            problems[-1] += "; " + repair
    return problems
