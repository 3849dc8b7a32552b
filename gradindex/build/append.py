"""Appending training samples to a finished index: ``add_samples`` (``gradindex add``).

The new images are featurized with the index's own spec and checkpoints (refused if the weights
changed) into a scratch build beside the index (``.<name>.adding``); the old rows and the new
ones are then assembled into a staging folder (``.<name>.staging``: vectors, both search indexes
rebuilt with the kind the index was asked for, approximate ones re-tuned and validated against
exact search by the search layer, manifest last), which is swapped in with one atomic exchange.
Until that exchange the original folder is not written to, so a killed ``add`` leaves it exactly
as it was (run the same ``add`` again; it starts over); one that fails removes its scratch and
staging folders; a failed write (disk full) says so in one line. A read-only index folder is
refused up front (an add replaces the folder). The new images' value range is their own
(``data_range=`` / ``--data-range``, else told from their values as a build tells its data's).
"""

from __future__ import annotations

import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from gradindex.build.pipeline import build_index
from gradindex.build.shards import assemble, open_part, plain_value
from gradindex.build.state import is_write_failure, write_reason
from gradindex.errors import (
    DataError,
    IndexStateError,
    ModelError,
    SampleStopError,
    SpecError,
    WriteError,
)
from gradindex.inputs.dataref import DataRef, parse_data
from gradindex.inputs.models import CheckpointSource, load_checkpoints
from gradindex.inputs.ranges import UINT8_RANGE
from gradindex.inputs.training_data import open_source
from gradindex.query import AttributionIndex
from gradindex.spec import BuildSpec
from gradindex.store.layout import MANIFEST, VECTORS
from gradindex.store.lifecycle import check_writable, folder_lock, staging_folder, swap_in
from gradindex.store.records import check_fingerprints, recorded_scheduler
from gradindex.store.vectors import VectorStore


def add_samples(
    index: str | os.PathLike[str],
    data: Any,
    *,
    ids: np.ndarray | list | None = None,
    labels: Any = None,
    prompts: Any = None,
    base_model: Any = None,
    checkpoints: list[CheckpointSource] | None = None,
    scheduler: Any = None,
    device: str = "cpu",
    progress: bool = True,
    data_range: tuple[float, float] | None = None,
) -> AttributionIndex:
    """Append the images in ``data`` to the finished index folder ``index``; returns it reopened.

    ids: one per new image. By default image files keep their names, and array rows continue
    the index's integer ids (largest + 1, + 2, ...), so adding the second half of a dataset gives
    the ids a build over the whole would. checkpoints: override the recorded sources (needed for
    indexes built from in-memory models); their weights must match the index's. labels /
    prompts / base_model: as for ``build_index``, for conditional or latent models.
    data_range: the new images' value range; by default told from them as a build tells its
    data's (``gradindex.inputs.ranges``), not taken from the index: their rows are those a
    build of them would store, whatever range the index's own images were in.
    """
    target = Path(index).resolve()  # a link or '.' names the real folder: one lock, one swap
    open_part(target)  # a missing or unfinished index is named before anything is created
    advice = f"an add writes beside the index: make {target.parent} writable"
    with folder_lock(target, advice):
        return _add(
            target, parse_data(data), ids, labels, prompts, base_model, checkpoints, scheduler, device,
            progress, data_range,
        )  # fmt: skip


def _add(
    target: Path,
    data: DataRef,
    ids: np.ndarray | list | None,
    labels: Any,
    prompts: Any,
    base_model: Any,
    checkpoints: list[CheckpointSource] | None,
    scheduler: Any,
    device: str,
    progress: bool,
    data_range: tuple[float, float] | None,
) -> AttributionIndex:
    """``add_samples`` holding the index's lock."""
    started = time.perf_counter()
    manifest = _addable(target)
    spec = BuildSpec.from_stored(manifest["spec"])
    ckpts = _checkpoints(manifest, checkpoints, scheduler)
    channels = manifest.get("image_shape", manifest["sample_shape"])[0]
    images = open_source(data, channels, resolution=spec.resolution, center_crop=spec.center_crop)
    with VectorStore.open(target / VECTORS) as store:
        old_ids = store.ids
    new_ids = _new_ids(ids, images.ids, old_ids, len(images))

    part = target.parent / f".{target.name}.adding"
    if part.exists():  # left by a killed add; never the only copy of anything
        shutil.rmtree(part)
    stage = None
    try:
        new = build_index(
            checkpoints=ckpts,
            data=images,
            ids=new_ids,
            labels=labels,
            prompts=prompts,
            base_model=base_model,
            out=part,
            spec=spec.replace(data_range=data_range),  # the new images' own range
            index="flat",
            device=device,
            progress=progress,
            weights=manifest.get("weights") or "raw",
            fidelity_sample=0,  # the index keeps its own record: same projection, same model
        )
        info = manifest["indexes"]["tracin"]
        added = {
            "rows": len(images),
            "first_row": len(old_ids),
            "data_range": list(_new_range(new.spec, spec)),
            "seconds": round(time.perf_counter() - started, 3),
        }
        base = {k: v for k, v in manifest.items() if k not in ("files", "data_seconds")}
        stage = staging_folder(target)
        assemble(
            stage,
            [target, part],
            base,
            info.get("requested_kind", "flat"),
            info.get("target_recall", 0.95),
            {"added": [*manifest.get("added", []), added]},
            started,
        )
        swap_in(stage, target)
    except SampleStopError as exc:  # its advice (--resume) is the build's: add has none
        raise DataError(
            f"{exc.sample}; nothing was added: fix the file and run add again"
        ) from None
    except BaseException as exc:
        if stage is not None and (target / MANIFEST).exists():  # the stage is no only copy
            shutil.rmtree(stage, ignore_errors=True)
        if isinstance(exc, (OSError, RuntimeError, WriteError)) and is_write_failure(exc):
            raise _write_failed(target, exc) from None  # its advice (--resume) is the build's
        raise
    finally:
        shutil.rmtree(part, ignore_errors=True)
    return AttributionIndex.open(
        target, checkpoints=checkpoints, scheduler=scheduler, device=device, base_model=base_model
    )


def _addable(target: Path) -> dict[str, Any]:
    """The manifest of a finished, writable index that is no shard."""
    manifest = open_part(target)
    check_writable(target, "add to it")
    if "shard" in manifest:
        raise IndexStateError(
            f"{target}: is one shard of a sharded build; merge the shards, then add to the result"
        )
    return manifest


def _new_range(new: BuildSpec, index: BuildSpec) -> tuple[float, float]:
    """The range the new images were read in; a warning when it is not the index's and both
    are float ranges (uint8 pixels are 0..255 without doubt)."""
    got, had = tuple(new.data_range or ()), tuple(index.data_range or ())
    if had and got != had and UINT8_RANGE not in (got, had):
        warnings.warn(
            f"the new images are read as [{got[0]:g}, {got[1]:g}] (told from their values), "
            f"the index's own as [{had[0]:g}, {had[1]:g}]; both are mapped to the model's input "
            f"from their own range. If the new ones are on the index's scale, add them with "
            f"--data-range {had[0]:g} {had[1]:g}",
            stacklevel=4,
        )
    return got  # type: ignore[return-value]


def _write_failed(target: Path, exc: BaseException) -> IndexStateError:
    """A failed write during add: the index was not touched (the new version is written beside
    it and swapped in only when complete), so the advice is to make room and add again."""
    size = sum(p.stat().st_size for p in target.iterdir() if p.is_file()) / 2**20
    return IndexStateError(
        f"{target}: writing failed ({write_reason(exc)}); nothing was added and the index is as "
        f"it was: free space beside it (an add writes a new copy, about {size:.3g} MiB plus the "
        "new rows, then swaps it in) and run the same add again"
    )


def _checkpoints(
    manifest: dict[str, Any], given: list[CheckpointSource] | None, scheduler: Any
) -> list[Any]:
    """The index's checkpoints, loaded, with the weights it was built from (checked)."""
    records = manifest["checkpoints"]
    sources = list(given) if given else [r["source"] for r in records]
    if not given and any(str(s).startswith("memory:") for s in sources):
        raise ModelError(
            "this index was built from in-memory models: pass them as "
            "checkpoints=[(model, scheduler), ...]"
        )
    if len(sources) != len(records):
        raise ModelError(f"the index has {len(records)} checkpoints but {len(sources)} were given")
    ckpts = load_checkpoints(
        sources,
        scheduler if scheduler is not None else recorded_scheduler(records),
        precondition=manifest["spec"].get("precondition", "none"),
        weights=manifest.get("weights"),
    )
    check_fingerprints(ckpts, records, "other weights; rebuild instead of adding")
    return ckpts


def _new_ids(ids: Any, data_ids: np.ndarray, old_ids: np.ndarray, n: int) -> np.ndarray:
    """Ids for the new rows, refused when of another kind than the index's or already in it."""
    if ids is not None:
        new = np.asarray(ids)
        if new.ndim != 1 or len(new) != n:
            raise SpecError(f"ids has shape {new.shape} but there are {n} new images")
        new = new if new.dtype.kind in "iu" else new.astype(str)
    elif data_ids.dtype.kind in "iu":  # arrays: ids are row numbers; continue the numbering
        if old_ids.dtype.kind not in "iu":
            raise SpecError(
                "the index names its samples (string ids) but the new images are an array "
                "without names; pass ids= with one name per image"
            )
        new = int(old_ids.max()) + 1 + np.arange(n, dtype=np.int64)
    else:
        new = data_ids
    if (new.dtype.kind in "iu") != (old_ids.dtype.kind in "iu"):
        kind = "integers" if old_ids.dtype.kind in "iu" else "strings"
        raise SpecError(f"the index's ids are {kind}; give the new samples {kind} too")
    if len(np.unique(new)) != n:
        raise SpecError("the new ids are not unique; give each new sample its own id")
    clash = np.intersect1d(old_ids, new)
    if clash.size:
        raise SpecError(
            f"{clash.size} of the new ids are already in the index (first: {plain_value(clash[0])!r}); "
            "ids must not collide: rename the files or pass other ids"
        )
    return new
