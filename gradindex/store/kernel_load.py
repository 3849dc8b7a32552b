"""Reading an index's ``kernel.h5`` for a kernel method: every declared shape and the file's
size checked against the manifest before a byte of data is read, and every problem named with
the command that repairs it (``gradindex kernel DIR``, seconds), never "rebuild the index".

Serves every format: 3 (per row set primal factors, :class:`gradindex.store.kernel.Kernel`, or
dual ones with the kept rows read from ``vectors.h5``, :class:`gradindex.store.kernel_dual.
DualKernel`), 2 (primal factors only: read as they are) and 1, written before session 8 (dense
Grams ``gram`` [C, d, d] float64, :class:`DenseKernel`, which solves by a cached Cholesky factor
as those builds did; ``gradindex kernel DIR`` rewrites either as format 3).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from scipy.linalg import cho_factor, cho_solve

from gradindex.errors import IndexStateError
from gradindex.store.kernel import (
    KERNEL_METHODS,
    SUFFIX,
    Kernel,
    check_lambdas,
    lambda_key,
)
from gradindex.store.kernel_dual import DualKernel
from gradindex.store.layout import KERNEL, REPAIRS, VECTORS, check_build_id, recorded_digest
from gradindex.store.vectors import VectorStore

logger = logging.getLogger(__name__)

LEGACY = {"tracin": "gram", "retrac": "gram_retrac"}
"""Row set → its dense Gram's dataset in a format-1 kernel.h5."""


class DenseKernel:
    """A format-1 kernel: G_c dense, q'_c = (G_c + λ_c I)⁻¹ q_c by Cholesky (cached per λ)."""

    def __init__(self, gram: np.ndarray, lambdas: list[float]):  # G [C, d, d], λ [C]
        self.gram = gram
        self.lambdas = check_lambdas(lambdas, len(gram))
        self._factors: dict[int, tuple[float, Any]] = {}

    def _factor(self, c: int, lam: float) -> Any:
        cached = self._factors.get(c)
        if cached is None or cached[0] != lam:
            a = self.gram[c] + lam * np.eye(self.gram.shape[-1])
            cached = (lam, cho_factor(a, lower=True, check_finite=False))
            self._factors[c] = cached
        return cached[1]

    def transform(self, queries: np.ndarray, lam: Any = None) -> np.ndarray:
        """Query rows [B, C·d] → q' [B, C·d] float32."""
        num_ckpts, d = self.gram.shape[0], self.gram.shape[-1]
        lambdas = self.lambdas if lam is None else check_lambdas(lam, num_ckpts)
        q = np.asarray(queries, dtype=np.float64).reshape(len(queries), num_ckpts, d)
        out = np.empty_like(q)
        for c in range(num_ckpts):
            out[:, c] = cho_solve(self._factor(c, lambdas[c]), q[:, c].T).T
        return out.reshape(len(queries), num_ckpts * d).astype(np.float32)


def load_kernel(
    folder: Path, manifest: dict[str, Any], rows: str, verify: bool = True
) -> Kernel | DualKernel | DenseKernel:
    """The kernel of a finished index's ``rows`` ("tracin": method 'trak', "retrac":
    'retrak'); a missing, truncated, foreign, malformed or altered kernel.h5 is refused in one
    line naming ``gradindex kernel DIR``. With ``verify``, its checksum is checked once its
    shapes are (a flipped byte in the factors would change every kernel score without a word;
    a caller that verified the file for the other rows passes False: one hash per file)."""
    kernel = _load(folder, manifest, rows)
    recorded = manifest.get("files", {}).get(KERNEL)
    if verify and isinstance(recorded, dict) and recorded.get("sha256"):  # "": format-1 record
        recorded_digest(folder, manifest, KERNEL, REPAIRS[KERNEL].format(folder=folder))
    return kernel


def _load(folder: Path, manifest: dict[str, Any], rows: str) -> Kernel | DualKernel | DenseKernel:
    """``load_kernel`` before the checksum: the record, size, build id and shapes checked."""
    path = folder / KERNEL
    record = manifest.get("kernel")
    method = next(m for m, r in KERNEL_METHODS.items() if r == rows)
    fix = REPAIRS[KERNEL].format(folder=folder)
    if isinstance(record, dict) and "skipped" in record:
        raise IndexStateError(f"{folder}: this index has no kernel: {record['skipped']}")
    if not isinstance(record, dict) or not path.exists() or lambda_key(rows) not in record:
        raise IndexStateError(
            f"{folder}: this index has no kernel of its {rows} rows (needed by method "
            f"{method!r}); add it with: gradindex kernel {folder}"
        )
    recorded = manifest.get("files", {}).get(KERNEL)
    size = path.stat().st_size
    if isinstance(recorded, dict) and recorded.get("bytes") not in (None, size):
        raise IndexStateError(
            f"{path}: {size} bytes but the manifest records {recorded['bytes']} (truncated or "
            f"replaced); {fix}"
        )
    num_ckpts = len(manifest["checkpoints"])
    d = int(manifest["dim"]) // num_ckpts
    try:
        with h5py.File(path, "r") as f:
            check_build_id(path, str(f.attrs.get("build_id", "")), manifest, fix)
            lambdas = list(record[lambda_key(rows)])
            if f"basis{SUFFIX[rows]}" in f:
                return _read_factors(f, rows, (num_ckpts, d), manifest, fix, lambdas)
            if f"dual_basis{SUFFIX[rows]}" in f:
                return _read_dual(folder, f, rows, num_ckpts, manifest, fix, lambdas)
            if LEGACY[rows] in f:
                gram = _dataset(f, LEGACY[rows], (num_ckpts, d, d), fix)[()]
                logger.warning("%s: a dense kernel (format 1); convert it: gradindex kernel %s",
                               path, folder)  # fmt: skip
                return DenseKernel(gram, lambdas)
    except OSError as err:  # not HDF5, truncated past its header, ...
        raise IndexStateError(f"{path}: unreadable ({err}); {fix}") from None
    raise IndexStateError(
        f"{path}: no kernel of the {rows} rows (needed by method {method!r}); {fix}"
    )


def _plain(f: h5py.File, name: str, fix: str) -> h5py.Dataset:
    """Dataset ``name`` if it is stored in the file itself (no external link, external
    storage or virtual source), before anything of it is read."""
    link = f.get(name, getlink=True)
    ds = f.get(name) if isinstance(link, h5py.HardLink) else None
    if not isinstance(ds, h5py.Dataset) or ds.external or ds.is_virtual:
        raise IndexStateError(f"{f.filename}: {name} is not a dataset stored in the file; {fix}")
    return ds


def _dataset(f: h5py.File, name: str, shape: tuple[int, ...], fix: str) -> h5py.Dataset:
    """Dataset ``name``, plain (``_plain``) and checked to be floats of ``shape``."""
    ds = _plain(f, name, fix)
    if ds.shape != shape or ds.dtype.kind != "f":
        raise IndexStateError(
            f"{f.filename}: {name} declares shape {ds.shape} ({ds.dtype}) but the index needs "
            f"{shape} floats; {fix}"
        )
    return ds


def _eigen(f: h5py.File, name: str, cd: tuple[int, int], most: int, fix: str) -> tuple:
    """(basis [C, side, r], eigenvalues [C, r], tail [C]) of dataset ``name`` (``basis`` or
    ``dual_basis``, suffixed), side = ``cd[1]``; its rank checked against ``most`` first."""
    sfx = name[name.index("basis") + 5 :]
    basis = _plain(f, name, fix)
    rank = basis.shape[-1] if basis.ndim == 3 else -1
    if not 1 <= rank <= most:
        raise IndexStateError(
            f"{f.filename}: {name} declares shape {basis.shape} but the index allows "
            f"({cd[0]}, {cd[1]}, <= {most}); {fix}"
        )
    u = _dataset(f, name, (*cd, rank), fix)[()]
    eig = _dataset(f, f"eigenvalues{sfx}", (cd[0], rank), fix)[()]
    tail = _dataset(f, f"tail{sfx}", (cd[0],), fix)[()]
    if not (np.isfinite(u).all() and np.all(eig >= 0) and np.all(tail >= 0)):
        raise IndexStateError(f"{f.filename}: kernel factors not finite or negative; {fix}")
    return u, eig, tail


def _read_factors(
    f: h5py.File, rows: str, cd: tuple[int, int], manifest: dict, fix: str, lambdas: list
) -> Kernel:
    """A row set's primal factors (format 2 or 3), rank at most min(rows, d)."""
    most = max(1, min(int(manifest.get("num_rows", 0)), cd[1]))
    return Kernel(*_eigen(f, f"basis{SUFFIX[rows]}", cd, most, fix), lambdas)


def _read_dual(
    folder: Path, f: h5py.File, rows: str, num_ckpts: int, manifest: dict, fix: str, lambdas: list
) -> DualKernel:
    """A row set's dual factors (format 3); its kept rows are read from vectors.h5 when first
    scored, their count checked against the factors now (the build id ties the two files)."""
    with VectorStore.open(folder / VECTORS) as store:
        keep = np.flatnonzero(~store.flagged)
        every = len(keep) == store.num_rows
    n = len(keep)
    v, eig, tail = _eigen(f, f"dual_basis{SUFFIX[rows]}", (num_ckpts, n), max(1, n), fix)

    def read() -> np.ndarray:
        with VectorStore.open(folder / VECTORS) as store:
            return store.vectors(rows, None if every else keep)

    weights = [float(c["weight"]) for c in manifest["checkpoints"]]
    name = f"dual_lead{SUFFIX[rows]}"
    lead = None
    if name in f:  # absent in files written before session 10: the float32 columns serve
        most = _plain(f, name, fix).shape[-1]
        lead = _dataset(f, name, (num_ckpts, n, most), fix)[()]
        if not (1 <= most <= v.shape[-1] and np.isfinite(lead).all()):
            raise IndexStateError(f"{f.filename}: {name} does not fit the dual basis; {fix}")
    return DualKernel(read, v, eig, tail, lambdas, weights, lead)
