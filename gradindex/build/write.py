"""Writing a planned build into its folder: rows, search indexes, kernel, manifest.

Holds ``write_build``: the rows batch by batch into ``vectors.h5`` (each batch committed, so a
killed build resumes where it stopped; a latent model's latents first), each method's search
index over the rows that are not flagged, the kernel, the projection-fidelity check and the
manifest, written last, so a folder without one never looks complete. What is written was
read and checked before (``gradindex.build.pipeline``), but for decoded files, checked as they are read
here; which folder, by ``gradindex.build.state``.
"""

from __future__ import annotations

import functools
import logging
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from gradindex.build.state import (
    Plan,
    is_write_failure,
    model_record,
    sample_error,
    write_error,
)
from gradindex.errors import DataError, GradIndexError, IndexStateError, WriteError
from gradindex.featurize.embedding import Embedder
from gradindex.featurize.fidelity import hold_sample, measure_fidelity
from gradindex.featurize.fidelity_sample import HeldSample
from gradindex.inputs.encoders import Conditioner
from gradindex.inputs.labels import ConditioningData
from gradindex.inputs.pixels import to_model_input
from gradindex.inputs.sources import prefetch
from gradindex.inputs.training_data import TrainingRows
from gradindex.search.faiss_index import METHODS
from gradindex.search.kernel_recall import with_search_record
from gradindex.search.ondisk import build_from_store
from gradindex.spec import BuildSpec
from gradindex.store.kernel import write_kernel
from gradindex.store.layout import (
    BUILD_STATE,
    FORMAT_VERSION,
    MANIFEST,
    VECTORS,
    faiss_file,
    file_records,
    write_json_atomic,
)
from gradindex.store.lifecycle import swap_in
from gradindex.store.vectors import VectorStore

WAIT_WARN_SHARE, WAIT_WARN_SECONDS = 0.25, 5.0  # waiting for data worth a warning
logger = logging.getLogger(__name__)


def write_build(
    plan: Plan,
    state: dict[str, Any],
    out: Path,
    target: Path,
    *,
    resume: bool,
    progress: bool,
    index: str,
    target_recall: float,
    fidelity_sample: int,
    started: float,
) -> None:
    """Write the planned build into ``out`` (``target`` itself, or the staging folder that
    replaces it): the rows, batch by batch, then each method's search index, the kernel and
    the manifest, last; a staged build is then swapped in. ``started``: perf_counter at the
    start of the build, for the manifest's build_seconds."""
    spec, ckpts, rows = plan.spec, plan.ckpts, plan.rows
    try:
        store = _open_store(out / VECTORS, plan, resume)
        held = hold_sample(plan.embedder, len(rows.images), fidelity_sample)  # small builds
        try:
            data_seconds = _fill_rows(
                store, plan.embedder, rows, spec, progress, plan.conditioner, held
            )
            flagged, build_id = store.flagged, store.build_id
        finally:
            store.close()
    except (OSError, RuntimeError) as exc:  # h5py's failed flushes are RuntimeErrors
        if not is_write_failure(exc):
            raise
        raise write_error(target, exc, staged=out != target) from None
    except _BadRead as exc:  # a decoded sample that cannot be read, named
        raise sample_error(exc.error, staged=out != target) from None
    keep = _indexed_rows(flagged)
    plan.embedder.release()  # the rows are featurized: their buffers are not held past this
    # before FAISS: it sets the OpenMP thread count torch shares
    fidelity = _fidelity(plan, store.path, keep, fidelity_sample, held)
    del held  # up to FULL_SPACE_BUDGET, not held past the check
    kind = "flat" if rows.shard else index  # the merged index gets the asked kind
    try:
        index_info = _search_indexes(store.path, out, keep, len(flagged), kind, target_recall)
    except WriteError as exc:  # every row is committed: a resume only rebuilds the indexes
        raise write_error(target, exc, staged=out != target) from None
    try:
        kernel = write_kernel(out, spec.weights(len(ckpts)), build_id)
        kernel = with_search_record(
            out, {**state, "kernel": kernel, "indexes": index_info, "build_id": build_id}
        )
    except (OSError, RuntimeError) as exc:
        if not is_write_failure(exc):
            raise
        raise write_error(target, exc, staged=out != target) from None

    manifest = {
        **state,
        **model_record(plan),
        "complete": True,
        "build_id": build_id,  # also in vectors.h5 and the FAISS sidecars: checked on open
        "num_flagged": int(flagged.sum()),
        "conditioning_data": state.get("conditioning", {}).get("data"),
        "indexes": index_info,
        "fidelity": fidelity,
        "kernel": kernel,
        "data_seconds": data_seconds,
        "files": file_records(out),
        "build_seconds": round(time.perf_counter() - started, 3),
    }
    if rows.shard is not None:
        manifest["shard"] = {
            **rows.shard,
            "merge_index": index,
            "merge_target_recall": target_recall,
        }
    write_json_atomic(out / MANIFEST, manifest)
    (out / BUILD_STATE).unlink(missing_ok=True)
    if out != target:  # the new index is complete: it replaces the old one in one step
        swap_in(out, target)


def _fidelity(
    plan: Plan, store_path: Path, keep: np.ndarray, sample: int, held: HeldSample | None
) -> dict[str, Any]:
    """The build's projection-fidelity record (``measure_fidelity`` on the written rows)."""
    rows = plan.rows
    return measure_fidelity(
        plan.embedder, plan.ckpts, functools.partial(_stored_rows, store_path), keep,
        images=rows.images, prep=rows.prep, conditioner=plan.conditioner, cond_data=rows.cond,
        sample=sample, held=held,
    )  # fmt: skip


def _open_store(path: Path, plan: Plan, resume: bool) -> VectorStore:
    """``vectors.h5`` to fill: a resumed build's (its shape checked), or a new one with the
    rows' ids, labels / captions and room for latents."""
    spec, rows, embedder = plan.spec, plan.rows, plan.embedder
    if resume and path.exists():
        store = VectorStore.open(path, "r+")
        if store.dim != embedder.dim or store.num_rows != len(rows.images):
            store.close()
            raise IndexStateError(f"{path}: shape differs from this build; use --overwrite")
        moved = _first_other_id(store, rows.ids)
        if moved is not None:
            store.close()
            raise IndexStateError(
                f"{path}: row {moved[0]} was {moved[1]!r} but the data now has {moved[2]!r} there "
                "(a file added, removed or renamed); resuming would put rows under other "
                "samples' ids: restore the data as it was, or rebuild with --overwrite"
            )
        return store
    store = VectorStore.create(
        path,
        rows.ids,
        embedder.dim,
        len(plan.ckpts),
        spec.num_draws,
        spec.store_dtype,
        {"spec": spec.to_json(), "format_version": FORMAT_VERSION},
    )
    _add_conditioning_columns(store, plan.conditioner, rows.cond, embedder.sample_shape)
    return store


def _fill_rows(
    store: VectorStore,
    embedder: Embedder,
    rows: TrainingRows,
    spec: BuildSpec,
    progress: bool,
    conditioner: Conditioner,
    held: HeldSample | None = None,
) -> dict[str, float]:
    """Embed every row not yet done, batch by batch, committing each batch to disk (a latent
    model's latents first, so a row marked done has its latent too), keeping the fidelity
    sample's full-space features in ``held`` when given. Returns the seconds spent
    reading the data and featurizing (this run's rows) and waiting for the data. A sample that
    cannot be read raises ``_BadRead``, apart from errors of featurizing what was read."""
    images, prep, cond_data = rows.images, rows.prep, rows.cond
    done = store.done
    bar = tqdm(
        total=len(images),
        initial=int(done.sum()),
        unit="img",
        desc="featurizing",
        disable=not progress,
        dynamic_ncols=True,
    )
    timing: dict[str, float] = {}
    started = time.perf_counter()
    batches = prefetch(
        images, _contiguous_batches(np.flatnonzero(~done), spec.batch_size), timing=timing
    )
    with bar:
        while True:
            try:  # decoded while the batch before is featurized
                start, stop, pixels = next(batches)
            except StopIteration:
                break
            except DataError as exc:
                raise _BadRead(exc) from None
            cond = conditioner.model_kwargs(cond_data.rows(start, stop), stop - start)
            x0 = to_model_input(pixels, **prep, warn=False)
            if conditioner.vae is not None:  # a latent model: its latents, stored with the row
                x0 = conditioner.encode_images(x0)
                store.write_column("latents", start, x0.cpu().numpy())
            keep = None if held is None else functools.partial(held.take, start)
            emb = embedder.embed(x0, cond, keep)
            store.write_rows(start, emb.tracin, emb.retrac, emb.norms, emb.flagged)
            bar.update(stop - start)
    timing["featurizing_s"] = round(time.perf_counter() - started, 3)
    _report_waiting(timing)
    return timing


class _BadRead(Exception):
    """A DataError raised by reading the data (not by featurizing what was read)."""

    def __init__(self, error: DataError) -> None:
        super().__init__(str(error))
        self.error = error


def _report_waiting(timing: dict[str, float]) -> None:
    """Say when featurizing spent a good part of its time waiting for the data: then the
    reading (a slow disk or network folder, large encoded images), not the model, sets the
    pace."""
    waited, total = timing.get("waiting_s", 0.0), timing["featurizing_s"]
    logger.info("featurizing took %.1f s, of which %.1f s waiting for data", total, waited)
    if waited > max(WAIT_WARN_SECONDS, WAIT_WARN_SHARE * total):
        logger.warning(
            "featurizing waited %.0f s of %.0f s for the training data to be read and decoded: "
            "the data source, not the model, sets the pace (a local copy, or images stored at "
            "the model's size, read faster)", waited, total,
        )  # fmt: skip


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


def _first_other_id(store: VectorStore, ids: Any, chunk: int = 1 << 20) -> tuple | None:
    """(row, stored id, id now) of the first row whose id differs from the stored one, read a
    chunk at a time; None when all agree."""
    stored = store.file["ids"]
    text = stored.asstr() if stored.dtype.kind == "O" else stored
    for a in range(0, len(stored), chunk):
        old = np.asarray(text[a : a + chunk]).astype(str)
        new = np.asarray(ids[a : a + chunk]).astype(str)
        differ = np.flatnonzero(old != new)
        if differ.size:
            r = int(differ[0])
            return a + r, str(old[r]), str(new[r])
    return None


def _contiguous_batches(rows: np.ndarray, size: int) -> Iterator[tuple[int, int]]:
    """(start, stop) runs of consecutive rows, at most ``size`` long."""
    i = 0
    while i < len(rows):
        j = i
        while j + 1 < len(rows) and j + 1 - i < size and rows[j + 1] == rows[j] + 1:
            j += 1
        yield int(rows[i]), int(rows[j]) + 1
        i = j + 1


def _indexed_rows(flagged: np.ndarray) -> np.ndarray:
    """The rows the search indexes hold: all but the flagged ones (a warning says how many);
    none at all is an error."""
    if flagged.any():
        warnings.warn(
            f"{int(flagged.sum())} training sample(s) had non-finite or zero gradients and are left "
            "out of the search indexes (see vectors.h5:/flagged)",
            stacklevel=4,  # build_index's caller: where its own warnings point
        )
    keep = np.flatnonzero(~flagged)
    if keep.size == 0:
        raise GradIndexError(
            "every training sample had non-finite or zero gradients; nothing to index"
        )
    return keep


def _stored_rows(path: Path, method: str, rows: np.ndarray) -> np.ndarray:
    """Stored rows of ``method`` read back from ``vectors.h5`` (what fidelity compares)."""
    with VectorStore.open(path) as reader:
        return reader.vectors(method, rows)


def _search_indexes(
    store_path: Path, out: Path, keep: np.ndarray, num_rows: int, kind: str, target_recall: float
) -> dict[str, Any]:
    """Each method's search index over the kept rows of the store, and its record."""
    index_info = {}
    for method in METHODS:  # one method's rows in memory at a time (none when on disk)
        with VectorStore.open(store_path) as reader:
            index_info[method] = build_from_store(
                reader,
                method,
                keep if keep.size < num_rows else None,
                kind,
                target_recall,
                out / faiss_file(method),
            )
    return index_info
