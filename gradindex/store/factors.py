"""``factors.h5``: the EK-FAC factors of method 'influence', one group per checkpoint.

Layout (plain h5py): group ``c<i>`` per checkpoint; in it one group per factored weight (its
parameter name with '.' as '/') holding ``A``, ``S`` (input / output-gradient covariances),
``QA``, ``QS`` (their eigenbases) and ``eig`` (the corrected eigenvalues), attrs ``cols`` and
``shape``; the dataset ``diag`` (the GGN diagonal of the other columns) with attr ``slices``
(JSON: unfactored parameter → columns). Root attrs: ``build_id`` (refused when it is not the
manifest's: the factors of another build), ``samples``. Written atomically (temporary file,
then rename), then recorded in the manifest (its ``factors`` record and checksum).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from gradindex.errors import IndexStateError
from gradindex.featurize.kfac import CheckpointFactors, LayerFactors
from gradindex.store.layout import (
    FACTORS,
    MANIFEST,
    REPAIRS,
    check_build_id,
    check_files,
    file_digest,
    read_manifest,
    recorded_digest,
    write_json_atomic,
)


def _recompute(folder: Path) -> str:
    return REPAIRS[FACTORS].format(folder=folder)


def write_factors(folder: Path, factors: list[CheckpointFactors], build_id: str | None) -> Path:
    """Write ``factors.h5`` atomically; returns its path."""
    tmp = folder / f".{FACTORS}.tmp"
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs["build_id"] = build_id or ""
            f.attrs["samples"] = int(factors[0].samples)
            for c, cf in enumerate(factors):
                g = f.create_group(f"c{c}")
                g.create_dataset("diag", data=cf.diag.numpy())
                g["diag"].attrs["slices"] = json.dumps(cf.diag_slices)
                g.attrs["layers"] = json.dumps([lay.name for lay in cf.layers])
                for lay in cf.layers:
                    lg = g.create_group(lay.name.replace(".", "/"))
                    for key in ("A", "S", "QA", "QS", "eig"):
                        lg.create_dataset(key, data=getattr(lay, key).numpy())
                    lg.attrs["cols"] = list(lay.cols)
                    lg.attrs["shape"] = list(lay.shape)
        os.replace(tmp, folder / FACTORS)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return folder / FACTORS


def record_factors(folder: Path, record: dict[str, Any]) -> None:
    """Add factors.h5 (checksum) and its record to the manifest, rewritten atomically, after
    every other file is checked against its recorded checksum."""
    manifest = read_manifest(folder)
    others = {k: v for k, v in manifest.get("files", {}).items() if k != FACTORS}
    problems = check_files(folder, {**manifest, "files": others}, checksums=True)
    if problems:
        raise IndexStateError(f"{problems[0]}; rebuild the index")
    path = folder / FACTORS
    files = {**others, FACTORS: {"bytes": path.stat().st_size, "sha256": file_digest(path)}}
    write_json_atomic(folder / MANIFEST, {**manifest, "factors": record, "files": files})


def load_factors(folder: Path, manifest: dict[str, Any]) -> list[CheckpointFactors]:
    """The factors of a finished index, refused when missing, stale, of another shape or
    altered (checksum against the manifest, checked once per opened index)."""
    path = folder / FACTORS
    if not isinstance(manifest.get("factors"), dict) or not path.exists():
        raise IndexStateError(
            f"{folder}: this index has no influence factors (needed by method 'influence'); "
            + _recompute(folder)
        )
    recorded = {k: v for k, v in manifest.get("files", {}).items() if k == FACTORS}
    if problems := check_files(folder, {"files": recorded}, checksums=False):
        raise IndexStateError(problems[0])  # truncated: opening the index left it to this
    num_ckpts = len(manifest["checkpoints"])
    try:
        with h5py.File(path, "r") as f:
            check_build_id(path, str(f.attrs.get("build_id", "")), manifest, _recompute(folder))
            if [k for k in f if k.startswith("c")] != [f"c{c}" for c in range(num_ckpts)]:
                raise IndexStateError(f"{path}: not {num_ckpts} checkpoints; {_recompute(folder)}")
            samples = int(f.attrs["samples"])
            factors = [_read_checkpoint(f[f"c{c}"], samples) for c in range(num_ckpts)]
    except (OSError, KeyError) as err:  # not HDF5, or damaged past its header
        raise IndexStateError(f"{path}: unreadable ({err}); {_recompute(folder)}") from None
    recorded_digest(folder, manifest, FACTORS, _recompute(folder))  # a flipped byte: other scores
    return factors


def _read_checkpoint(g: h5py.Group, samples: int) -> CheckpointFactors:
    def t(x: Any) -> torch.Tensor:
        return torch.from_numpy(np.asarray(x[()], dtype=np.float64))

    layers = []
    for name in json.loads(g.attrs["layers"]):
        lg = g[name.replace(".", "/")]
        cols, shape = (tuple(int(v) for v in lg.attrs[k]) for k in ("cols", "shape"))
        lay = LayerFactors(name, cols, shape, t(lg["A"]), t(lg["S"]))  # type: ignore[arg-type]
        lay.QA, lay.QS, lay.eig = t(lg["QA"]), t(lg["QS"]), t(lg["eig"])
        layers.append(lay)
    slices = {k: (int(a), int(b)) for k, (a, b) in json.loads(g["diag"].attrs["slices"]).items()}
    return CheckpointFactors(layers, t(g["diag"]), slices, samples)
