"""The offline builder: checkpoints + training data → a finished index folder.

Holds ``build_index``, which wires the pipeline in one direction:

    load checkpoints → load + validate data → Embedder (gradients → aggregate → project)
    → VectorStore rows, batch by batch → VectorIndex per method → manifest (written last)

A build that stops early leaves ``build.json`` and no manifest, so the folder never looks
complete; ``resume=True`` finishes it, skipping rows already marked done. ``overwrite=True``
builds the new index in a staging folder beside the old one and swaps it in at the end, so the
old index stays usable until the new one is complete. One build writes a folder at a time
(``lifecycle.folder_lock``). Everything that can be checked (data, conditioning, checkpoint
weights, index kind) is checked before the first row is featurized.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from gradindex.errors import (
    GradIndexError,
    IndexStateError,
    ModelError,
    SpecError,
    WriteError,
)
from gradindex.featurize.embedding import Embedder
from gradindex.featurize.fidelity import DEFAULT_SAMPLE, check_sample, measure_fidelity
from gradindex.featurize.gradients import select_parameters
from gradindex.index.kernel import write_kernel
from gradindex.index.layout import (
    BUILD_STATE,
    FORMAT_VERSION,
    MANIFEST,
    VECTORS,
    faiss_file,
    file_records,
    package_versions,
    write_json_atomic,
)
from gradindex.index.lifecycle import (
    check_writable,
    folder_lock,
    staging_folder,
    staging_path,
    swap_in,
)
from gradindex.index.ondisk import build_from_store
from gradindex.index.search import METHODS
from gradindex.index.store import VectorStore
from gradindex.index.tuning import check_kind
from gradindex.inputs.conditioner import Conditioner
from gradindex.inputs.conditioning import ConditioningData
from gradindex.inputs.data import to_model_input
from gradindex.inputs.devices import resolve_device
from gradindex.inputs.models import CheckpointSource, load_checkpoints, with_model
from gradindex.inputs.open_data import open_source, source_conditioning
from gradindex.inputs.slices import shard_rows
from gradindex.inputs.sources import DataSource, prefetch
from gradindex.query import AttributionIndex
from gradindex.spec import NOT_IDENTITY, BuildSpec

logger = logging.getLogger(__name__)


def _one_writer(build: Callable[..., AttributionIndex]) -> Callable[..., AttributionIndex]:
    """Run ``build`` holding the lock of its ``out`` folder: a second build into the same folder
    is refused while this one runs (rather than told to --resume it)."""

    @functools.wraps(build)
    def locked(*, out: str | Path, **kwargs: Any) -> AttributionIndex:
        out = Path(out).resolve()  # a link or '.' names the real folder: one lock, one swap
        with folder_lock(out):
            return build(out=out, **kwargs)

    return locked


@_one_writer
def build_index(
    *,
    checkpoints: list[CheckpointSource],
    data: Any,
    out: str | Path,
    spec: BuildSpec | None = None,
    model: torch.nn.Module | None = None,
    scheduler: Any = None,
    ids: np.ndarray | list | None = None,
    labels: Any = None,
    prompts: Any = None,
    base_model: Any = None,
    index: str = "flat",
    target_recall: float = 0.95,
    device: str = "cpu",
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    shard: tuple[int, int] | None = None,
    fidelity_sample: int = DEFAULT_SAMPLE,
) -> AttributionIndex:
    """Build an attribution index over ``data`` at ``checkpoints`` into the folder ``out``.

    checkpoints: diffusers folders, ``(module, scheduler)`` pairs, or state dicts / weight files
    applied to ``model``. data: an array, ``.npy``/``.npz``, ``file.h5:/dataset`` or an image
    folder. index: the search index kind per method: ``flat`` (exact), ``ivf``, ``hnsw``, a FAISS
    factory string, ``ondisk`` (an IVF whose lists stay in a file next to the index, built from
    the store in chunks and memory-mapped at query time: for indexes larger than RAM, see
    ``gradindex.index.ondisk``) or ``auto`` (flat / HNSW / IVF in RAM, or ``ondisk`` when the rows would
    take more than half the available memory). shard: ``(i, n)``
    builds only shard i of n (a contiguous slice of the rows, see ``gradindex.scale.shards``) as an
    exact index; ``index`` is then recorded for ``merge_shards``. labels / prompts: per-image
    class labels / captions of a conditional model, when ``data`` does not carry them (see
    ``gradindex.inputs.conditioning``). base_model: the Stable-Diffusion-layout folder holding
    ``vae/``, ``text_encoder/``, ``tokenizer/`` when the checkpoint folders (and their parent)
    do not, or a mapping of those component objects. fidelity_sample: rows whose stored scores
    are checked against exact ones at the end (manifest ``fidelity``, see
    ``gradindex.featurize.fidelity``; 0 skips it).
    """
    started = time.perf_counter()
    device = resolve_device(device)
    spec = spec or BuildSpec()
    out = Path(out)
    fidelity_sample = check_sample(fidelity_sample)
    ckpts = load_checkpoints(with_model(checkpoints, model), scheduler, base_model)
    _check_finite(ckpts)
    spec = _resolve_timesteps(spec, ckpts[0].num_train_timesteps)
    spec.weights(len(ckpts))  # checks the count
    spec.check_row_dim(_num_params(ckpts[0].model, spec), len(ckpts))  # FAISS's width limit
    conditioner = Conditioner.for_checkpoints(ckpts, base_model, spec.latents, spec.seed, device)

    channels, height, width = conditioner.image_shape(ckpts[0].sample_shape())
    images = open_source(data, channels)  # lazy: rows are read a batch at a time
    row_ids = _resolve_ids(ids, images.ids, len(images))
    cond_data = source_conditioning(images, data, conditioner.kind, labels, prompts)
    if spec.data_range is None:
        spec = spec.replace(data_range=images.data_range())
    prep = dict(
        channels=channels, size=(height, width), data_range=spec.data_range, resize=spec.resize
    )
    shard_info = None
    if shard is not None:  # after data_range: every shard resolves it from the whole dataset
        lo, hi = shard_rows(shard, len(images))
        shard_info = {"index": shard[0], "count": shard[1], "start": lo, "stop": hi}
        shard_info["total_rows"] = len(images)
        images, row_ids = images.rows(lo, hi), row_ids[lo:hi]  # only this shard's rows read
        cond_data = cond_data.rows(lo, hi)
    for start in range(0, len(images), 4096):  # validate everything before writing anything
        to_model_input(images[start : start + 4096], **prep, warn=start == 0)  # resize: once
    if conditioner.kind == "class":  # labels in the model's range
        conditioner.model_kwargs(cond_data, len(images))
    cond_record = conditioner.record(cond_data)
    embedder = Embedder(ckpts, spec, device)
    check_kind(index, embedder.dim, target_recall)

    state = {
        "spec": spec.to_dict(),
        "checkpoints": [c.fingerprint for c in ckpts],
        "num_rows": len(images),
        "format_version": FORMAT_VERSION,
    }
    if shard_info is not None:
        state["shard"] = shard_info
    if conditioner.kind != "none" or conditioner.vae is not None:
        state["conditioning"] = {**cond_record, "data": cond_data.digest()}
    target, out = out, _prepare_folder(out, state, resume=resume, overwrite=overwrite)
    if out is None:
        logger.info("%s: already finished with these settings; nothing to resume", target)
        return AttributionIndex.open(
            target, checkpoints=ckpts, device=device, base_model=base_model
        )

    vec_path = out / VECTORS
    if resume and vec_path.exists():
        store = VectorStore.open(vec_path, "r+")
        if store.dim != embedder.dim or store.num_rows != len(images):
            store.close()
            raise IndexStateError(f"{vec_path}: shape differs from this build; use --overwrite")
    else:
        store = VectorStore.create(
            vec_path,
            row_ids,
            embedder.dim,
            len(ckpts),
            spec.num_draws,
            spec.store_dtype,
            {"spec": spec.to_json(), "format_version": FORMAT_VERSION},
        )
        _add_conditioning_columns(store, conditioner, cond_data, embedder.sample_shape)
    try:
        _fill_rows(store, embedder, images, prep, spec, progress, conditioner, cond_data)
        flagged, build_id = store.flagged, store.build_id
    except OSError as exc:
        raise _write_error(target, exc, staged=out != target) from None
    finally:
        store.close()

    if flagged.any():
        warnings.warn(
            f"{int(flagged.sum())} training sample(s) had non-finite or zero gradients and are left "
            "out of the search indexes (see vectors.h5:/flagged)",
            stacklevel=2,
        )
    keep = np.flatnonzero(~flagged)
    if keep.size == 0:
        raise GradIndexError(
            "every training sample had non-finite or zero gradients; nothing to index"
        )

    # before FAISS: it sets the OpenMP thread count that torch shares
    def stored_rows(method: str, rows: np.ndarray) -> np.ndarray:
        with VectorStore.open(store.path) as reader:
            return reader.vectors(method, rows)

    fidelity = measure_fidelity(
        embedder, ckpts, stored_rows, keep, images=images, prep=prep, conditioner=conditioner,
        cond_data=cond_data, sample=fidelity_sample,
    )  # fmt: skip
    index_info = {}
    try:
        for method in METHODS:  # one method's rows in memory at a time (none when on disk)
            with VectorStore.open(store.path) as reader:
                index_info[method] = build_from_store(
                    reader,
                    method,
                    keep if keep.size < len(flagged) else None,
                    "flat" if shard_info else index,  # the merged index gets the asked kind
                    target_recall,
                    out / faiss_file(method),
                )
    except WriteError as exc:  # every row is committed: a resume only rebuilds the indexes
        raise _write_error(target, exc, staged=out != target) from None
    try:
        kernel = write_kernel(out, spec.weights(len(ckpts)), build_id)
    except OSError as exc:
        raise _write_error(target, exc, staged=out != target) from None

    manifest = {
        **state,
        "complete": True,
        "spec_fingerprint": spec.fingerprint(),
        "build_id": build_id,  # also in vectors.h5 and the FAISS sidecars: checked on open
        "checkpoints": [
            {"source": c.source, "fingerprint": c.fingerprint, "weight": w}
            for c, w in zip(ckpts, spec.weights(len(ckpts)), strict=True)
        ],
        "versions": package_versions(),
        "dim": embedder.dim,
        "proj_dim": embedder.block_dim,
        "layers": embedder.layer_routes(),
        "num_params": embedder.num_params,
        "num_flagged": int(flagged.sum()),
        "sample_shape": list(embedder.sample_shape),
        "image_shape": [channels, height, width],
        "conditioning": cond_record,
        "conditioning_data": state.get("conditioning", {}).get("data"),
        "base_model": str(Path(base_model).resolve())
        if isinstance(base_model, (str, os.PathLike))
        else None,
        "prediction_type": ckpts[0].prediction_type,
        "timesteps": spec.timestep_values(),
        "indexes": index_info,
        "fidelity": fidelity,
        "kernel": kernel,
        "files": file_records(out),
        "build_seconds": round(time.perf_counter() - started, 3),
    }
    if shard_info is not None:
        manifest["shard"] = {
            **shard_info,
            "merge_index": index,
            "merge_target_recall": target_recall,
        }
    write_json_atomic(out / MANIFEST, manifest)
    (out / BUILD_STATE).unlink(missing_ok=True)
    if out != target:  # the new index is complete: it replaces the old one in one step
        swap_in(out, target)
    return AttributionIndex.open(target, checkpoints=ckpts, device=device, base_model=base_model)


def _write_error(out: Path, exc: OSError | WriteError, staged: bool = False) -> IndexStateError:
    """Disk full, quota, permissions: say so, and that committed rows survive a resume
    (``staged``: of an --overwrite build, whose rows wait beside the old index)."""
    import errno

    why = (
        "disk full"
        if getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT)
        else str(exc).splitlines()[0]
    )
    again = "--overwrite --resume" if staged else "--resume"
    return IndexStateError(
        f"{out}: writing failed ({why}); rows already committed are kept: free space or fix the "
        f"folder, then run the same build with {again}"
    )


def _check_finite(ckpts: list[Any]) -> None:
    """Refuse a checkpoint holding NaN / inf weights (a diverged run) before featurizing: every
    gradient through it would be non-finite and every sample flagged."""
    for c in ckpts:
        for name, t in [*c.model.named_parameters(), *c.model.named_buffers()]:
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise ModelError(
                    f"checkpoint {c.source}: {name} holds NaN or infinite values (the training "
                    "diverged or the file is damaged); use an earlier checkpoint"
                )


def _fill_rows(
    store: VectorStore,
    embedder: Embedder,
    images: DataSource,
    prep: dict[str, Any],
    spec: BuildSpec,
    progress: bool,
    conditioner: Conditioner | None = None,
    cond_data: ConditioningData | None = None,
) -> None:
    """Embed every row not yet done, batch by batch, committing each batch to disk (a latent
    model's latents first, so a row marked done has its latent too)."""
    conditioner = conditioner or Conditioner("none")
    cond_data = cond_data or ConditioningData()
    done = store.done
    todo = np.flatnonzero(~done)
    bar = tqdm(
        total=len(images),
        initial=int(done.sum()),
        unit="img",
        desc="featurizing",
        disable=not progress,
        dynamic_ncols=True,
    )
    with bar:
        batches = _contiguous_batches(todo, spec.batch_size)
        for start, stop, pixels in prefetch(images, batches):  # decoding overlaps featurizing
            x0 = conditioner.encode_images(to_model_input(pixels, **prep, warn=False))
            if conditioner.vae is not None:
                store.write_column("latents", start, x0.cpu().numpy())
            cond = conditioner.model_kwargs(cond_data.rows(start, stop), stop - start)
            emb = embedder.embed(x0, cond)
            store.write_rows(start, emb.tracin, emb.retrac, emb.norms, emb.flagged)
            bar.update(stop - start)


def _add_conditioning_columns(
    store: VectorStore,
    conditioner: Conditioner,
    cond_data: ConditioningData,
    sample_shape: tuple[int, ...],
) -> None:
    """The labels / captions the rows were computed with, and room for a latent model's
    latents, stored next to the rows in ``vectors.h5``."""
    if cond_data.labels is not None:
        store.add_column("labels", cond_data.labels)
    if cond_data.prompts is not None:
        store.add_column("prompts", cond_data.prompts)
    if conditioner.vae is not None:
        store.add_column("latents", shape=tuple(sample_shape))


def _contiguous_batches(rows: np.ndarray, size: int):
    """(start, stop) runs of consecutive rows, at most ``size`` long."""
    i = 0
    while i < len(rows):
        j = i
        while j + 1 < len(rows) and j + 1 - i < size and rows[j + 1] == rows[j] + 1:
            j += 1
        yield int(rows[i]), int(rows[j]) + 1
        i = j + 1


def _prepare_folder(
    out: Path, state: dict[str, Any], *, resume: bool, overwrite: bool
) -> Path | None:
    """Refuse to clobber a finished index or someone else's folder; check a resumed build
    has the same spec, checkpoints and data size. Returns the folder to write: ``out``, or with
    ``overwrite`` of an existing index the staging folder beside it (swapped in when complete);
    None when ``resume`` finds the same build already finished (a re-run job step is a no-op)."""
    if out.exists() and not out.is_dir():
        raise IndexStateError(f"{out}: exists and is not a folder; choose another --out")
    if out.exists() and overwrite and any(out.iterdir()):
        if not ((out / MANIFEST).exists() or (out / BUILD_STATE).exists()):
            raise IndexStateError(f"{out}: not an index folder; refusing to overwrite it")
        return _staging(out, state, resume=resume)
    if out.exists() and (out / MANIFEST).exists():
        if resume:
            done = _as_state(json.loads((out / MANIFEST).read_text()), state)
            diffs = _settings_diffs(done, state)
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
        diffs = _settings_diffs(json.loads((out / BUILD_STATE).read_text()), state)
        if diffs:
            raise IndexStateError(
                f"{out}: the unfinished build used different settings ({', '.join(diffs)}); "
                "resume with the same ones or pass --overwrite"
            )
        return out
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
    if resume and old.exists() and not _settings_diffs(json.loads(old.read_text()), state):
        return stage
    stage = staging_folder(out)  # removes what an earlier build left
    write_json_atomic(stage / BUILD_STATE, state)
    return stage


def _settings_diffs(old: dict[str, Any], state: dict[str, Any]) -> list[str]:
    """What differs between a recorded build state and the build asked for now: spec fields
    as ``spec.<name>``, other settings by their key."""
    spec = old.get("spec") or {}
    names = sorted(set(state["spec"]) - set(NOT_IDENTITY))  # batch size: same rows, any value
    diffs = [f"spec.{k}" for k in names if spec.get(k) != state["spec"][k]]
    keys = sorted((set(state) | set(old)) - {"spec"})
    return diffs + [k for k in keys if old.get(k) != state.get(k)]


def _as_state(manifest: dict[str, Any], state: dict[str, Any]) -> dict[str, Any]:
    """A finished index's manifest in the shape of a build state, for ``_settings_diffs``."""
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


def _num_params(model: torch.nn.Module, spec: BuildSpec) -> int:
    """The gradient coordinates the spec selects (an identity projection stores them all)."""
    named = dict(model.named_parameters())
    return sum(named[n].numel() for n in select_parameters(model, spec.params))


def _resolve_timesteps(spec: BuildSpec, num_train_timesteps: int) -> BuildSpec:
    if spec.num_train_timesteps is None:
        return spec.replace(num_train_timesteps=num_train_timesteps)
    if spec.num_train_timesteps != num_train_timesteps:
        raise SpecError(
            f"BuildSpec.num_train_timesteps={spec.num_train_timesteps} but the scheduler trains on "
            f"{num_train_timesteps}; leave it unset"
        )
    return spec


def _resolve_ids(ids: Any, data_ids: np.ndarray, n: int) -> np.ndarray:
    if ids is None:
        return data_ids
    arr = np.asarray(ids)
    if arr.ndim != 1 or len(arr) != n:
        raise SpecError(
            f"ids has shape {arr.shape} but there are {n} images; give one id per image"
        )
    if len(np.unique(arr)) != n:
        raise SpecError("ids are not unique; give each training sample its own id")
    return arr if arr.dtype.kind in "iu" else arr.astype(str)
