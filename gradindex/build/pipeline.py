"""The offline builder: checkpoints + training data → a finished index folder.

Holds ``build_index``, which wires the pipeline in one direction:

    load checkpoints → load + validate data → Embedder (gradients → aggregate → project)
    → VectorStore rows, batch by batch → VectorIndex per method → manifest (written last)

A build that stops early leaves ``build.json`` and no manifest, so the folder never looks
complete; ``resume=True`` finishes it, skipping rows already marked done. ``overwrite=True``
builds the new index in a staging folder beside the old one and swaps it in at the end, so the
old index stays usable until the new one is complete. One build writes a folder at a time
(``lifecycle.folder_lock``). Everything that can be checked (data, conditioning, checkpoint
weights, index kind) is checked before the first row is featurized, except the pixels of
decoded files (image folders, tars, datasets): each is decoded once, as it is featurized.

Here: reading and checking the inputs into a ``build_state.Plan`` (``_read_rows`` opens the
training data lazily and checks array rows in one pass before anything is written); which
folder to write and what identifies the build: ``gradindex.build.state``; writing rows, indexes
and manifest: ``gradindex.build.write``.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gradindex.build.state import Plan, Rows, build_state, prepare_folder
from gradindex.build.write import write_build
from gradindex.errors import ModelError, SpecError
from gradindex.featurize.budget import parse_memory
from gradindex.featurize.embedding import Embedder
from gradindex.featurize.fidelity import DEFAULT_SAMPLE, check_sample
from gradindex.featurize.gradients import select_parameters
from gradindex.inputs.dataref import DataRef, parse_data
from gradindex.inputs.devices import resolve_device
from gradindex.inputs.encoders import Conditioner
from gradindex.inputs.models import Checkpoint, CheckpointSource, load_checkpoints, with_model
from gradindex.inputs.pixels import to_model_input
from gradindex.inputs.run_records import resolve_from_run
from gradindex.inputs.slices import data_digest, shard_rows
from gradindex.inputs.training_data import open_inputs
from gradindex.query import AttributionIndex
from gradindex.search.tuning import check_kind
from gradindex.spec import BuildSpec
from gradindex.store.lifecycle import folder_lock

logger = logging.getLogger(__name__)


def _one_writer(build: Callable[..., AttributionIndex]) -> Callable[..., AttributionIndex]:
    """Run ``build`` holding the lock of its ``out`` folder: a second build into the same folder
    is refused while this one runs (rather than told to --resume it)."""

    @functools.wraps(build)
    def locked(*, out: str | Path, **kwargs: Any) -> AttributionIndex:
        out = Path(out).resolve()  # a link or '.' names the real folder: one lock, one swap
        with folder_lock(out, "choose an --out in a writable folder"):
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
    data_options: Mapping[str, Any] | None = None,
    run_records: bool = True,
    weights: str = "raw",
    max_memory: int | str | None = None,
    featurize_path: str = "auto",
) -> AttributionIndex:
    """Build an attribution index over ``data`` at ``checkpoints`` into the folder ``out``.

    checkpoints: diffusers folders, ``(module, scheduler)`` pairs, or state dicts / weight files
    applied to ``model``. data: an array, ``.npy``/``.npz``, ``file.h5:/dataset``, an image
    folder, a Hugging Face dataset (``save_to_disk`` folder, parquet, a Hub folder), tar shards
    or a ``DataSource`` (``gradindex.inputs.training_data``). index: ``flat`` (exact), ``ivf``,
    ``hnsw``, a FAISS factory string, ``ondisk`` (IVF lists memory-mapped from a file:
    ``gradindex.search.ondisk``) or ``auto``. shard: ``(i, n)`` builds only shard i of n as an
    exact index (``gradindex.build.shards``). labels / prompts: per-image class labels /
    captions when ``data`` does not carry them. base_model: the Stable-Diffusion-layout folder
    (or mapping) holding ``vae/``, ``text_encoder/``, ``tokenizer/``. fidelity_sample: rows
    whose stored scores are checked against exact ones (``gradindex.featurize.fidelity``; 0
    skips it). data_options: how ``data`` is read (``open_data.open_source``: dataset columns,
    ``split``, ``on_error``). run_records: fill the loss settings the checkpoints' training
    run logged where ``spec`` leaves them at their defaults (``gradindex.inputs.run_records``;
    also resolves ``checkpoint_weights='auto'``). weights: 'raw' or 'ema' for every checkpoint
    folder of a diffusers training run (``gradindex.inputs.runs``). All recorded in the
    manifest.
    """
    started = time.perf_counter()
    device = resolve_device(device)
    max_memory = parse_memory(max_memory)
    fidelity_sample = check_sample(fidelity_sample)
    spec = spec or BuildSpec()
    ckpts = load_checkpoints(
        with_model(checkpoints, model), scheduler, base_model, spec.precondition, weights
    )
    spec, run = resolve_from_run(spec, ckpts, run_records)
    spec = _check_checkpoints(spec, ckpts)
    conditioner = Conditioner.for_checkpoints(ckpts, base_model, spec.latents, spec.seed, device)
    spec, rows = _read_rows(
        parse_data(data), ids, labels, prompts, spec, conditioner, ckpts[0].sample_shape(), shard,
        dict(data_options or {}),
    )  # fmt: skip
    cond_record = conditioner.record(rows.cond)
    embedder = Embedder(ckpts, spec, device, featurize_path, max_memory)
    check_kind(index, embedder.dim, target_recall)
    plan = Plan(spec, ckpts, conditioner, rows, embedder, base_model, cond_record, run, weights)

    state = build_state(plan)
    target = Path(out)
    out = prepare_folder(target, state, resume=resume, overwrite=overwrite)
    if out is None:
        logger.info("%s: already finished with these settings; nothing to resume", target)
    else:
        write_build(
            plan, state, out, target, resume=resume, progress=progress, index=index,
            target_recall=target_recall, fidelity_sample=fidelity_sample, started=started,
        )  # fmt: skip
    return AttributionIndex.open(target, checkpoints=ckpts, device=device, base_model=base_model)


def _read_rows(
    data: DataRef,
    ids: Any,
    labels: Any,
    prompts: Any,
    spec: BuildSpec,
    conditioner: Conditioner,
    sample_shape: tuple[int, ...],
    shard: tuple[int, int] | None,
    options: dict[str, Any],
) -> tuple[BuildSpec, Rows]:
    """Open the training data (images read lazily; ids, labels / captions with it), resolve
    its value range from the whole data set (every shard the same), cut a shard's rows, and
    check them. Arrays, ``.npy`` and HDF5 rows are all checked (one pass of reads) before
    anything is written; decoded sources (image folders, tars, datasets), whose listing already
    checked what it can, only their first row: each row is decoded once, as it is featurized,
    and a bad one stops the build there, naming it, its committed rows kept for a resume (a
    pass decoding everything first would not overlap featurizing, and take hours at 10^8).
    Returns the spec with its data_range, and the rows."""
    channels, height, width = conditioner.image_shape(sample_shape)
    trainer = {"resolution": spec.resolution, "center_crop": spec.center_crop}  # inputs.prepare
    kind = conditioner.kind
    images, cond_data = open_inputs(data, channels, kind, labels, prompts, **options, **trainer)
    row_ids = _resolve_ids(ids, images.ids, len(images))  # lazy: rows read a batch at a time
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
        shard_info["data_digest"] = data_digest(images, row_ids)  # merge: same data, same order
        images, row_ids = images.rows(lo, hi), row_ids[lo:hi]  # only this shard's rows read
        cond_data = cond_data.rows(lo, hi)
    checked = 1 if images.decodes else len(images)  # decoded rows: checked as featurized
    for start in range(0, checked, 4096):
        to_model_input(images[start : min(start + 4096, checked)], **prep, warn=start == 0)
    if conditioner.kind == "class":  # labels in the model's range
        conditioner.model_kwargs(cond_data, len(images))
    return spec, Rows(images, row_ids, cond_data, prep, shard_info, data.location, options or None)


def _check_checkpoints(spec: BuildSpec, ckpts: list[Checkpoint]) -> BuildSpec:
    """Check the checkpoints against the spec before any data is read (finite weights, their
    count against the spec's weights, the row width FAISS takes); fills num_train_timesteps."""
    _check_finite(ckpts)
    spec = _resolve_timesteps(spec, ckpts[0].num_train_timesteps)
    spec.weights(len(ckpts))  # checks the count
    spec.check_row_dim(_num_params(ckpts[0].model, spec), len(ckpts))  # FAISS's width limit
    return spec


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
