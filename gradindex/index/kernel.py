"""The per-checkpoint Grams of the stored rows, and the kernel query transforms they give.

Checkpoint c's block of a stored TracIn row (columns c·d:(c+1)·d) is √w_c φ_c(z), where
φ_c = P_c · mean gradient is TRAK's feature; its block of a ReTrac row is √w_c ρ_c(z), ρ_c the
unit-normalised projected mean of the unit per-timestep gradients. One streamed pass over
``vectors.h5`` gives, for both row sets,

    G_c = Σ_z φ_c(z) φ_c(z)ᵀ      (d × d, float64, over the unflagged rows)

stored in ``kernel.h5`` (datasets ``gram`` [C, d, d] of the TracIn rows and ``gram_retrac``
of the ReTrac rows, attrs ``rows``, ``build_id``), readable with plain h5py. A kernel score is
then an inner product with the rows already indexed:

    Σ_c w_c φ_c(q)ᵀ (G_c + λ_c I)⁻¹ φ_c(z) = ⟨q', x(z)⟩,   q'_c = (G_c + λ_c I)⁻¹ q_c

with q_c the query's block (√w_c φ_c(q)) and x(z) the stored row: ``trak`` searches the
TracIn index with a transformed TracIn query (TRAK; D-TRAK on a ``loss="square"`` index) and
``retrak`` the ReTrac index with a transformed ReTrac query (the kernel on ReTrac's
normalised rows). Default λ_c = LAMBDA_SCALE · (trace(G_c) − top eigenvalue) / d, the scale
chosen once on held-out calibration digits of ``benchmarks/bench_lds.py`` (never on its LDS
targets); any λ > 0 keeps N < d well-posed.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from scipy.linalg import cho_factor, cho_solve
from scipy.sparse.linalg import eigsh

from gradindex.errors import IndexStateError, SearchError
from gradindex.index.layout import (
    KERNEL,
    MANIFEST,
    VECTORS,
    check_files,
    file_digest,
    read_manifest,
    write_json_atomic,
)
from gradindex.index.store import ChunkedRows, VectorStore

LAMBDA_SCALE = 3.0
"""s of the default λ_c = s · (trace(G_c) − ‖G_c‖₂) / d: the mean eigenvalue with the top one
left out, which alone is ~99% of the trace of 'square'-loss rows and ~40-60% of 'mse' ones
(one ridge rule then fits both). s was chosen once on 100 calibration digits of
``benchmarks/bench_lds.py``, never on its LDS targets (``benchmarks/results/lds.md``)."""
KERNEL_METHODS = {"trak": "tracin", "retrak": "retrac"}
"""Search method served by a kernel → the stored rows (and Gram) it uses."""
DATASETS = {"tracin": "gram", "retrac": "gram_retrac"}
"""Row set → its Gram's dataset in kernel.h5."""
MAX_KERNEL_DIM = 8192
"""Largest d with a kernel: a d × d float64 Gram per checkpoint is 512 MiB at 8192 (an
``identity`` projection's d is the parameter count, whose Gram would not fit)."""
LAMBDA_RULE = f"lambda_c = {LAMBDA_SCALE} * (trace(G_c) - top eigenvalue) / d"


def gram_from_store(
    store: VectorStore, weights: Sequence[float]
) -> tuple[dict[str, np.ndarray], int]:
    """({rows: G [C, d, d] float64} for the TracIn and the ReTrac rows, rows counted): a
    chunked pass over each row set's unflagged rows."""
    num_ckpts = len(weights)
    if store.dim % num_ckpts:
        raise IndexStateError(
            f"{store.path}: row width {store.dim} is not a multiple of {num_ckpts} checkpoints"
        )
    d = store.dim // num_ckpts
    keep = np.flatnonzero(~store.flagged)
    grams = {}
    for rows in DATASETS:
        gram = np.zeros((num_ckpts, d, d), dtype=np.float64)
        for _, block in ChunkedRows(store.file[rows], keep).chunks():
            for c in range(num_ckpts):  # one checkpoint's columns in float64 at a time
                x = block[:, c * d : (c + 1) * d].astype(np.float64)
                gram[c] += x.T @ x
        gram /= np.asarray(weights, dtype=np.float64)[:, None, None]  # √w_c φ_c → φ_c
        grams[rows] = gram
    return grams, len(keep)


def top_eigenvalue(g: np.ndarray) -> float:
    """The largest eigenvalue of a symmetric PSD matrix (Lanczos above d = 256, from a fixed
    start vector: the recorded λ is reproducible)."""
    if len(g) <= 256:
        return float(np.linalg.eigvalsh(g)[-1])
    v0 = np.ones(len(g))
    return float(eigsh(g, k=1, which="LA", v0=v0, return_eigenvectors=False)[0])


def default_lambdas(gram: np.ndarray) -> list[float]:
    """λ_c = LAMBDA_SCALE · (trace(G_c) − top eigenvalue) / d; trace(G_c) / d in its place when
    the rows span one direction, 1.0 when they are all zero."""
    d = gram.shape[-1]
    out = []
    for g in gram:
        trace = float(np.trace(g))
        rest = trace - top_eigenvalue(g) if trace > 0 else 0.0
        lam = LAMBDA_SCALE * (rest if rest > 1e-9 * trace else trace) / d
        out.append(lam if math.isfinite(lam) and lam > 0 else 1.0)
    return out


def too_wide(d: int) -> str | None:
    """Why an index with d columns per checkpoint gets no kernel, or None when it gets one."""
    if d <= MAX_KERNEL_DIM:
        return None
    return (
        f"d = {d} per checkpoint > {MAX_KERNEL_DIM}: its d x d Gram would take "
        f"{8 * d * d / 2**30:.1f} GiB per checkpoint; build with a projection "
        f"(proj_dim <= {MAX_KERNEL_DIM}) for method 'trak'"
    )


def write_kernel(folder: Path, weights: Sequence[float], build_id: str | None) -> dict[str, Any]:
    """Compute the Gram of ``folder``'s vectors.h5, write ``kernel.h5`` and return the
    manifest's ``kernel`` record ({"skipped": why} and no file when d is too wide)."""
    with VectorStore.open(folder / VECTORS) as store:
        why = too_wide(store.dim // len(weights))
        if why is not None:
            (folder / KERNEL).unlink(missing_ok=True)
            return {"skipped": why}
        grams, rows = gram_from_store(store, weights)
    return _write(folder, grams, rows, build_id)


def merge_kernels(
    folder: Path,
    parts: Sequence[tuple[Path, str | None, int]],
    weights: Sequence[float],
    build_id: str | None,
) -> dict[str, Any]:
    """The kernel of rows assembled from index folders, in ``folder``: the sum of the parts'
    Grams (G is additive over rows), each given as (its folder, the build id of its
    vectors.h5, its unflagged rows). A part without a kernel of its own rows (an index built
    before kernels) makes it one streamed pass over the assembled rows instead."""
    total, rows = None, 0
    for part, part_id, part_rows in parts:
        gram = _own_gram(part / KERNEL, part_id, part_rows)
        if gram is None or (total is not None and gram["tracin"].shape != total["tracin"].shape):
            return write_kernel(folder, weights, build_id)
        total = gram if total is None else {k: total[k] + gram[k] for k in total}
        rows += part_rows
    if total is None:
        return write_kernel(folder, weights, build_id)
    return _write(folder, total, rows, build_id)


def _own_gram(path: Path, build_id: str | None, rows: int) -> dict[str, np.ndarray] | None:
    """The Grams in ``path`` if they were computed over that build's ``rows`` rows (a kernel
    written before the ReTrac Gram existed counts as none), else None."""
    if not path.exists():
        return None
    with h5py.File(path, "r") as f:
        if str(f.attrs.get("build_id", "")) != (build_id or "") or f.attrs.get("rows") != rows:
            return None
        if not all(name in f for name in DATASETS.values()):
            return None
        return {r: f[name][()] for r, name in DATASETS.items()}


def lambda_key(rows: str) -> str:
    """The manifest's / kernel.h5's key of a row set's default λ list."""
    return "lambda" if rows == "tracin" else f"lambda_{rows}"


def _write(
    folder: Path, grams: dict[str, np.ndarray], rows: int, build_id: str | None
) -> dict[str, Any]:
    """Write ``kernel.h5`` atomically (temporary file, then rename); the manifest record."""
    lambdas = {r: default_lambdas(g) for r, g in grams.items()}
    tmp = folder / f".{KERNEL}.tmp"
    try:
        with h5py.File(tmp, "w") as f:
            for r, gram in grams.items():
                f.create_dataset(DATASETS[r], data=gram)
                f.attrs[lambda_key(r)] = np.asarray(lambdas[r])
            f.attrs["rows"] = rows
            f.attrs["build_id"] = build_id or ""
        os.replace(tmp, folder / KERNEL)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    record: dict[str, Any] = {"rows": rows, "rule": LAMBDA_RULE}
    record.update({lambda_key(r): lam for r, lam in lambdas.items()})
    return {**record, "proj_dim": grams["tracin"].shape[-1]}


def add_kernel(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """Compute (or recompute) the kernel of a finished index built before it existed, and
    record it in the manifest (rewritten atomically); every other file is first checked
    against its recorded checksum, so a damaged index is never blessed. Returns the record.
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
    record = write_kernel(path, weights, manifest.get("build_id"))
    kpath = path / KERNEL
    files = {**others, KERNEL: {"bytes": kpath.stat().st_size, "sha256": file_digest(kpath)}}
    write_json_atomic(path / MANIFEST, {**manifest, "kernel": record, "files": files})
    return record


def check_lambdas(lam: float | Sequence[float], num_ckpts: int) -> list[float]:
    """One λ for every checkpoint, or one per checkpoint; each finite and > 0."""
    values = [lam] * num_ckpts if np.ndim(lam) == 0 else list(lam)  # type: ignore[list-item]
    if len(values) != num_ckpts:
        raise SearchError(
            f"lambda has {len(values)} values for {num_ckpts} checkpoints; give one or one each"
        )
    try:
        out = [float(v) for v in values]
    except (TypeError, ValueError):
        raise SearchError(f"lambda={lam!r}: must be a number > 0") from None
    if not all(math.isfinite(v) and v > 0 for v in out):
        raise SearchError(f"lambda={lam!r}: must be finite and > 0 (ridge of G_c + lambda I)")
    return out


class Kernel:
    """G_c and the default λ_c of one row set of an index; ``transform`` turns query rows of
    that set into the rows whose inner product with the stored rows is the kernel score
    (TracIn rows: TRAK; ReTrac rows: 'retrak')."""

    def __init__(self, gram: np.ndarray, lambdas: Sequence[float]):  # G [C, d, d], λ [C]
        self.gram = gram
        self.lambdas = check_lambdas(list(lambdas), len(gram))
        self._factors: dict[int, tuple[float, Any]] = {}  # c -> (λ, Cholesky factor)

    @classmethod
    def load(cls, folder: Path, manifest: dict[str, Any], rows: str = "tracin") -> Kernel:
        """The kernel of a finished index's ``rows`` ("tracin": method 'trak', "retrac":
        'retrak'); an index built before it gets told how to add it."""
        path = folder / KERNEL
        record = manifest.get("kernel")
        method = next(m for m, r in KERNEL_METHODS.items() if r == rows)
        if isinstance(record, dict) and "skipped" in record:
            raise IndexStateError(f"{folder}: this index has no kernel: {record['skipped']}")
        if not isinstance(record, dict) or not path.exists() or lambda_key(rows) not in record:
            raise IndexStateError(
                f"{folder}: this index has no kernel of its {rows} rows (needed by method "
                f"{method!r}); add it with: gradindex kernel {folder}"
            )
        with h5py.File(path, "r") as f:
            if DATASETS[rows] not in f:
                raise IndexStateError(
                    f"{path}: no Gram of the {rows} rows (needed by method {method!r}); "
                    f"recompute it with: gradindex kernel {folder}"
                )
            gram = f[DATASETS[rows]][()]
            build_id = str(f.attrs.get("build_id", ""))
        if manifest.get("build_id") and build_id != manifest["build_id"]:
            raise IndexStateError(
                f"{path}: build id {build_id} but the manifest's is {manifest['build_id']}; "
                f"recompute it with: gradindex kernel {folder}"
            )
        num_ckpts = len(manifest["checkpoints"])
        d = int(manifest["dim"]) // num_ckpts
        if gram.shape != (num_ckpts, d, d):
            raise IndexStateError(
                f"{path}: Gram of shape {gram.shape} but the index needs {(num_ckpts, d, d)}; "
                f"recompute it with: gradindex kernel {folder}"
            )
        return cls(gram, record[lambda_key(rows)])

    def _factor(self, c: int, lam: float) -> Any:
        cached = self._factors.get(c)
        if cached is None or cached[0] != lam:
            a = self.gram[c] + lam * np.eye(self.gram.shape[-1])
            cached = (lam, cho_factor(a, lower=True, check_finite=False))
            self._factors[c] = cached
        return cached[1]

    def transform(self, queries: np.ndarray, lam: Any = None) -> np.ndarray:
        """Query rows [B, C·d] → q' [B, C·d] float32, q'_c = (G_c + λ_c I)⁻¹ q_c."""
        num_ckpts, d = self.gram.shape[0], self.gram.shape[-1]
        lambdas = self.lambdas if lam is None else check_lambdas(lam, num_ckpts)
        q = np.asarray(queries, dtype=np.float64).reshape(len(queries), num_ckpts, d)
        out = np.empty_like(q)
        for c in range(num_ckpts):
            out[:, c] = cho_solve(self._factor(c, lambdas[c]), q[:, c].T).T
        return out.reshape(len(queries), num_ckpts * d).astype(np.float32)
