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

Here: loading the checkpoints and planning the build (a ``build.state.Plan``); the user's
``data`` is parsed once (``inputs.dataref.parse_data``) and opened and checked before anything
is written by ``inputs.training_data.open_training``; which folder to write and what identifies
the build: ``gradindex.build.state``; writing rows, indexes and manifest:
``gradindex.build.write``. A training image's walk through these: docs/architecture.md.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gradindex.build.state import Plan, build_state, prepare_folder, resumed_spec
from gradindex.build.write import write_build
from gradindex.errors import ModelError, SpecError
from gradindex.featurize.auto import decide_auto, describe_auto
from gradindex.featurize.budget import parse_memory
from gradindex.featurize.embedding import Embedder
from gradindex.featurize.fidelity import DEFAULT_SAMPLE, check_sample
from gradindex.featurize.gradients import select_parameters
from gradindex.inputs.dataref import parse_data
from gradindex.inputs.devices import resolve_device
from gradindex.inputs.encoders import Conditioner
from gradindex.inputs.models import Checkpoint, CheckpointSource, load_checkpoints, with_model
from gradindex.inputs.run_records import resolve_from_run
from gradindex.inputs.training_data import open_training
from gradindex.query import AttributionIndex
from gradindex.search.tuning import check_kind
from gradindex.spec import BuildSpec
from gradindex.store.lifecycle import folder_lock

logger = logging.getLogger(__name__)


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
    skips it). data_options: how ``data`` is read (``training_data.open_source``: dataset columns,
    ``split``, ``on_error``). run_records: fill the loss settings the checkpoints' training
    run logged where ``spec`` leaves them at their defaults (``gradindex.inputs.run_records``;
    also resolves ``checkpoint_weights='auto'``). weights: 'raw' or 'ema' for every checkpoint
    folder of a diffusers training run (``gradindex.inputs.runs``). All recorded in the
    manifest.
    """
    started = time.perf_counter()
    max_memory, fidelity_sample = parse_memory(max_memory), check_sample(fidelity_sample)
    target = Path(out).resolve()  # a link or '.' names the real folder: one lock, one swap
    with folder_lock(target, "choose an --out in a writable folder"):  # one build at a time
        device = resolve_device(device)
        spec, ckpts, conditioner, run = _load_models(
            checkpoints, model, scheduler, base_model, spec or BuildSpec(), run_records, weights,
            device,
        )  # fmt: skip
        resumed = resumed_spec(target, resume, overwrite)
        spec, auto = _decide_auto(spec, ckpts, device, resumed)
        spec, rows = open_training(
            parse_data(data), ids, {"labels": labels, "prompts": prompts}, spec, conditioner,
            ckpts[0].sample_shape(), shard, dict(data_options or {}),
        )  # fmt: skip
        embedder = Embedder(ckpts, spec, device, featurize_path, max_memory)
        check_kind(index, embedder.dim, target_recall)
        plan = Plan(
            spec, ckpts, conditioner, rows, embedder, base_model, conditioner.record(rows.cond),
            run, weights, auto,
        )  # fmt: skip
        state = build_state(plan)
        out = prepare_folder(target, state, resume=resume, overwrite=overwrite)
        if out is None:
            logger.info("%s: already finished with these settings; nothing to resume", target)
        else:
            write_build(
                plan, state, out, target, resume=resume, progress=progress, index=index,
                target_recall=target_recall, fidelity_sample=fidelity_sample, started=started,
            )  # fmt: skip
    return AttributionIndex.open(target, checkpoints=ckpts, device=device, base_model=base_model)


def _load_models(
    checkpoints: list[CheckpointSource],
    model: torch.nn.Module | None,
    scheduler: Any,
    base_model: Any,
    spec: BuildSpec,
    run_records: bool,
    weights: str,
    device: str,
) -> tuple[BuildSpec, list[Checkpoint], Conditioner, dict[str, Any] | None]:
    """The checkpoints, loaded and checked before any data is read, the spec completed from
    them and their run's records, and the conditioner (encoders) they need."""
    ckpts = load_checkpoints(
        with_model(checkpoints, model), scheduler, base_model, spec.precondition, weights
    )
    spec, run = resolve_from_run(spec, ckpts, run_records)
    spec = _check_checkpoints(spec, ckpts)
    conditioner = Conditioner.for_checkpoints(ckpts, base_model, spec.latents, spec.seed, device)
    return spec, ckpts, conditioner, run


def _check_checkpoints(spec: BuildSpec, ckpts: list[Checkpoint]) -> BuildSpec:
    """Check the checkpoints against the spec before any data is read (finite weights, their
    count against the spec's weights); fills num_train_timesteps."""
    _check_finite(ckpts)
    spec = _resolve_timesteps(spec, ckpts[0].num_train_timesteps)
    spec.weights(len(ckpts))  # checks the count
    return spec


def _decide_auto(
    spec: BuildSpec, ckpts: list[Checkpoint], device: str, resumed: dict[str, Any] | None
) -> tuple[BuildSpec, dict[str, Any] | None]:
    """What 'auto' leaves open, decided by the model's size and the device (a resumed build
    keeps its own decisions), logged; then the row width FAISS takes is checked."""
    model = ckpts[0].model
    spec, record = decide_auto(spec, model, select_parameters(model, spec.params), device, resumed)
    if record is not None:
        logger.info("auto: %s", describe_auto(record))
    spec.check_row_dim(_num_params(model, spec), len(ckpts))  # FAISS's width limit
    return spec, record


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
