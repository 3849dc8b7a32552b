"""What a build is: its checked inputs, the records that identify it, its folder's states.

Holds:
- ``Plan``: a build's inputs (spec, checkpoints, conditioner, embedder, training rows:
  ``inputs.training_data.TrainingRows``), read and checked by ``gradindex.build.pipeline``
  before anything is written.
- ``build_state``: the record of a build's settings (spec, checkpoints, rows, shard,
  conditioning) written to ``build.json`` before the first row and kept in the manifest.
- ``prepare_folder``: from the folder's state (absent / empty, unfinished ``build.json``,
  finished ``manifest.json``, or anything else) and ``resume`` / ``overwrite``, the folder a
  build writes: the asked one, a staging folder beside a finished index it replaces, or none
  (the same build finished already); everything else is refused with what to do.
- ``model_record``: what the manifest keeps of the model and rows, which a query repeats.
- ``settings_diffs``: which recorded settings differ from the asked ones (a resume must match).
- ``write_error``: a failed write (disk full, permissions) as the error that says how to resume;
  ``is_write_failure`` / ``write_reason``: which errors are failed writes, and why.
"""

from __future__ import annotations

import errno
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gradindex.errors import DataError, IndexStateError, SampleStopError, WriteError
from gradindex.featurize.embedding import Embedder
from gradindex.inputs.components import checkpoint_config
from gradindex.inputs.encoders import Conditioner
from gradindex.inputs.models import Checkpoint
from gradindex.inputs.training_data import TrainingRows
from gradindex.spec import NOT_IDENTITY, OMITTED_AT_DEFAULT, BuildSpec
from gradindex.store.layout import (
    BUILD_STATE,
    FORMAT_VERSION,
    MANIFEST,
    VECTORS,
    lost_manifest,
    package_versions,
    write_json_atomic,
)
from gradindex.store.lifecycle import check_writable, staging_folder, staging_path


@dataclass
class Plan:
    """A build's inputs, read and checked before anything is written."""

    spec: BuildSpec  # num_train_timesteps and data_range filled in
    ckpts: list[Checkpoint]
    conditioner: Conditioner
    rows: TrainingRows
    embedder: Embedder
    base_model: Any  # as given: a folder, a mapping of components, or None
    cond_record: dict[str, Any]  # conditioner.record(rows.cond): what a query repeats
    run: dict[str, Any] | None = None  # what came from the run's records (run_records.py)
    weights: str = "raw"  # which weights of a training run's folders: raw / ema
    auto: dict[str, Any] | None = None  # what 'auto' decided and why (featurize.auto)


def build_state(plan: Plan) -> dict[str, Any]:
    """The settings a resumed build must repeat: spec, checkpoint fingerprints, row count,
    shard, and for a conditional or latent model its conditioning record with the digest of
    its labels / captions."""
    state = {
        "spec": plan.spec.to_dict(),
        "checkpoints": [c.fingerprint for c in plan.ckpts],
        "num_rows": len(plan.rows.images),
        "format_version": FORMAT_VERSION,
    }
    if plan.rows.shard is not None:  # the data digest is merge's check (ids are resume's)
        state["shard"] = {k: v for k, v in plan.rows.shard.items() if k != "data_digest"}
    if plan.conditioner.kind != "none" or plan.conditioner.vae is not None:
        state["conditioning"] = {**plan.cond_record, "data": plan.rows.cond.digest()}
    return state


def resumed_spec(out: Path, resume: bool, overwrite: bool) -> dict[str, Any] | None:
    """The stored spec of the build ``resume`` finishes in ``out`` (its ``build.json``, the
    staging folder's with ``overwrite``, or a finished manifest), or None; unreadable: None
    (``prepare_folder`` says what is wrong)."""
    if not resume:
        return None
    folder = staging_path(out) if overwrite else out
    for name in (BUILD_STATE, MANIFEST):
        try:
            spec = json.loads((folder / name).read_text()).get("spec")
        except (OSError, ValueError, AttributeError):
            continue
        return spec if isinstance(spec, dict) else None
    return None


def prepare_folder(
    out: Path, state: dict[str, Any], *, resume: bool, overwrite: bool
) -> Path | None:
    """Refuse to clobber a finished index or someone else's folder; check a resumed build
    has the same spec, checkpoints and data size. Returns the folder to write: ``out``, or with
    ``overwrite`` of an existing index the staging folder beside it (swapped in when complete);
    None when ``resume`` finds the same build already finished (a re-run job step is a no-op)."""
    if out.exists() and not out.is_dir():
        raise IndexStateError(f"{out}: exists and is not a folder; choose another --out")
    if out.exists() and overwrite and any(out.iterdir()):
        if not any((out / n).exists() for n in (MANIFEST, BUILD_STATE, VECTORS)):
            raise IndexStateError(f"{out}: not an index folder; refusing to overwrite it")
        return _staging(out, state, resume=resume)
    if out.exists() and (out / MANIFEST).exists():
        if resume:
            done = _as_state(json.loads((out / MANIFEST).read_text()), state)
            diffs = settings_diffs(done, state)
            if not diffs:
                return None
            raise IndexStateError(
                f"{out}: already holds a finished index built with different settings "
                f"({', '.join(diffs)}); pass --overwrite to rebuild it"
            )
        raise IndexStateError(
            f"{out}: already holds a finished index; pass --overwrite to rebuild it"
        )
    if out.exists() and (out / BUILD_STATE).exists():
        if not resume:
            raise IndexStateError(
                f"{out}: holds an unfinished build; pass --resume to finish it or --overwrite"
            )
        diffs = settings_diffs(json.loads((out / BUILD_STATE).read_text()), state)
        if diffs:
            raise IndexStateError(
                f"{out}: the unfinished build used different settings ({', '.join(diffs)}); "
                "resume with the same ones or pass --overwrite"
            )
        return out
    if out.exists() and (out / VECTORS).exists():  # a finished index whose manifest is gone
        raise IndexStateError(lost_manifest(out))
    if out.exists() and any(out.iterdir()):
        raise IndexStateError(
            f"{out}: folder is not empty and holds no index; choose another --out"
        )
    write_json_atomic(out / BUILD_STATE, state)
    return out


def _staging(out: Path, state: dict[str, Any], *, resume: bool) -> Path:
    """The staging folder an --overwrite build of ``out`` writes: a killed one's, to finish
    (``resume`` with the same settings), or a new one."""
    check_writable(out, "overwrite it")
    stage = staging_path(out)
    old = stage / BUILD_STATE
    if resume and old.exists() and not settings_diffs(json.loads(old.read_text()), state):
        return stage
    stage = staging_folder(out)  # removes what an earlier build left
    write_json_atomic(stage / BUILD_STATE, state)
    return stage


def model_record(plan: Plan) -> dict[str, Any]:
    """The manifest's record of what the rows were computed with, which a query repeats."""
    spec, ckpts, embedder, base_model = plan.spec, plan.ckpts, plan.embedder, plan.base_model
    return {
        "spec_fingerprint": spec.fingerprint(),
        "checkpoints": [
            {
                "source": c.source,
                "fingerprint": c.fingerprint,  # of the weights
                "config": checkpoint_config(c.model, c.scheduler),  # what else decides them
                "weight": w,
                "weights": c.weights,
                "scheduler": c.scheduler_source,
            }  # fmt: skip
            for c, w in zip(ckpts, spec.weights(len(ckpts)), strict=True)
        ],
        "weights": plan.weights,  # raw / ema: one kind for every checkpoint (inputs.runs)
        "versions": package_versions(),
        "dim": embedder.dim,
        "proj_dim": embedder.block_dim,
        "layers": embedder.layer_routes(),
        "featurize": embedder.featurize_record(),  # the path a query repeats
        "num_params": embedder.num_params,
        "sample_shape": list(embedder.sample_shape),
        "image_shape": [plan.rows.prep["channels"], *plan.rows.prep["size"]],
        "conditioning": plan.cond_record,
        "data_source": plan.rows.source,  # where viewers read training images (gradindex serve)
        "data_options": plan.rows.options,  # and how (a dataset's columns, on_error)
        "base_model": str(Path(base_model).resolve())
        if isinstance(base_model, (str, os.PathLike))
        else None,
        "prediction_type": ckpts[0].prediction_type,
        "timesteps": spec.timestep_values(),
        "run_records": plan.run,
        "auto": plan.auto,
    }


def settings_diffs(old: dict[str, Any], state: dict[str, Any]) -> list[str]:
    """What differs between a recorded build state and the build asked for now: spec fields
    as ``spec.<name>``, other settings by their key."""
    # fields left out at their default (OMITTED_AT_DEFAULT) read as the default on either side
    spec, new = ({**OMITTED_AT_DEFAULT, **s} for s in (old.get("spec") or {}, state["spec"]))
    names = sorted(set(new) - set(NOT_IDENTITY))  # batch size: same rows, any value
    diffs = [f"spec.{k}" for k in names if spec.get(k) != new[k]]
    keys = sorted((set(state) | set(old)) - {"spec"})
    return diffs + [k for k in keys if old.get(k) != state.get(k)]


def _as_state(manifest: dict[str, Any], state: dict[str, Any]) -> dict[str, Any]:
    """A finished index's manifest in the shape of a build state, for ``settings_diffs``."""
    old = {k: manifest.get(k) for k in state}
    old["checkpoints"] = [c.get("fingerprint") for c in manifest.get("checkpoints", [])]
    if "shard" in state:  # the manifest adds the merge settings
        old["shard"] = {k: (manifest.get("shard") or {}).get(k) for k in state["shard"]}
    elif "shard" in manifest:
        old["shard"] = manifest["shard"]
    if "conditioning" in state:  # the manifest keeps the data digest beside the record
        old["conditioning"] = {
            **(manifest.get("conditioning") or {}),
            "data": manifest.get("conditioning_data"),
        }
    return old


def sample_error(exc: DataError, staged: bool = False) -> SampleStopError:
    """A sample that could not be read while featurizing (decoded sources are checked as they
    are read): its one-line message, and how to go on without redoing the committed rows."""
    again = "--overwrite --resume" if staged else "--resume"
    return SampleStopError(
        f"{exc}; the rows before it are kept: repair that file in place (same name) and run the "
        f"same build with {again}, or leave bad samples out with --on-error skip --overwrite",
        str(exc),
    )


def write_errno(exc: BaseException) -> int | None:
    """The OS error number of a failed write: an OSError's, or the one HDF5 reports in the
    RuntimeError h5py raises when flushing fails ("file write failed: ... errno = 28")."""
    code = getattr(exc, "errno", None)
    if code is None and isinstance(exc, RuntimeError):
        found = re.search(r"errno = (\d+)", str(exc))
        code = int(found.group(1)) if found else None
    return code


def is_write_failure(exc: BaseException) -> bool:
    """An OSError, a WriteError, or h5py's RuntimeError for a write the OS refused (any other
    RuntimeError, e.g. from featurizing, is not one)."""
    if isinstance(exc, (OSError, WriteError)):
        return True
    return isinstance(exc, RuntimeError) and "write failed" in str(exc)


def write_reason(exc: BaseException) -> str:
    """'disk full' for ENOSPC / EDQUOT, else the OS's words (or the error's first line)."""
    code = write_errno(exc)
    if code in (errno.ENOSPC, errno.EDQUOT):
        return "disk full"
    return os.strerror(code) if code else (str(exc).splitlines() or [type(exc).__name__])[0]


def write_error(out: Path, exc: BaseException, staged: bool = False) -> WriteError:
    """Disk full, quota, permissions: say so, and that committed rows survive a resume
    (``staged``: of an --overwrite build, whose rows wait beside the old index)."""
    again = "--overwrite --resume" if staged else "--resume"
    return WriteError(
        f"{out}: writing failed ({write_reason(exc)}); rows already committed are kept: free "
        f"space or fix the folder, then run the same build with {again}",
        write_errno(exc),
    )
