"""Distributed builds under ``torch.distributed``: ``torchrun`` or any launcher that sets
RANK / WORLD_SIZE (SLURM ``srun`` with those exported, a Kubernetes job...).

Holds ``world_from_env`` and ``distributed_build``. Each rank builds shard RANK/WORLD_SIZE of the
rows (``gradindex.build.shards``) into its own folder ``<out>.shards/rank-R-of-W``, on its own GPU
(``cuda:LOCAL_RANK``) when ``device="cuda"``. The ranks then meet in one collective that also
carries each rank's outcome, and rank 0 merges the shards into ``out`` and removes them.

Why this design rather than gathering tensors: the ranks exchange nothing but a few short
strings, over gloo (CPU, always available), so the only shared resource is the file system the
index is written to anyway; a failed or killed rank leaves a resumable shard (``--resume``
finishes unfinished shards and reuses finished ones); and the merged index is exactly what
``gradindex merge`` makes from the same shard folders, with the same checks.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

from gradindex.build.pipeline import build_index
from gradindex.build.shards import merge_shards
from gradindex.errors import GradIndexError, SpecError, first_line
from gradindex.query import AttributionIndex
from gradindex.spec import BuildSpec
from gradindex.store.lifecycle import check_target

logger = logging.getLogger(__name__)

# ranks wait for the slowest one to finish featurizing its shard: hours on big data, so the
# collective's timeout is long (GRADINDEX_DIST_TIMEOUT_S overrides it); torchrun tears the group
# down anyway when a rank dies
DEFAULT_TIMEOUT_S = 7 * 24 * 3600


def world_from_env() -> tuple[int, int] | None:
    """(rank, world size) from RANK / WORLD_SIZE, or None when not launched with 2+ processes."""
    world = os.environ.get("WORLD_SIZE")
    if world is None:
        return None
    rank = os.environ.get("RANK", "")
    try:
        r, w = int(rank), int(world)
    except ValueError:
        raise SpecError(
            f"WORLD_SIZE={world!r} RANK={rank!r}: a distributed launch needs both as integers"
        ) from None
    if w < 1 or not 0 <= r < w:
        raise SpecError(f"RANK={r} WORLD_SIZE={w}: need 0 <= RANK < WORLD_SIZE")
    return None if w == 1 else (r, w)


def shard_root(out: Path) -> Path:
    """Where the ranks of a build into ``out`` write their shards."""
    return out.parent / f"{out.name}.shards"


def distributed_build(
    *,
    checkpoints: list[Any],
    data: Any,
    out: str | os.PathLike[str],
    spec: BuildSpec | None = None,
    scheduler: Any = None,
    labels: Any = None,
    prompts: Any = None,
    base_model: Any = None,
    index: str = "flat",
    target_recall: float = 0.95,
    device: str = "cpu",
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    keep_shards: bool = False,
    fidelity_sample: int = 32,
    data_options: Mapping[str, Any] | None = None,
    run_records: bool = True,
    weights: str = "raw",
    max_memory: int | str | None = None,
) -> AttributionIndex | None:
    """Build ``out`` with every rank of the process group (initialised here from the launcher's
    environment unless the caller already did). Returns the index on rank 0, None elsewhere.
    Arguments are ``build_index``'s (``max_memory`` per rank), the same on every rank. With
    ``resume`` a rank's finished shard is reused when its settings are the asked ones, refused
    naming them when not. ``keep_shards`` keeps the shard folders after a successful merge."""
    import torch.distributed as dist

    own_group = not dist.is_initialized()
    if own_group:
        seconds = float(os.environ.get("GRADINDEX_DIST_TIMEOUT_S", DEFAULT_TIMEOUT_S))
        dist.init_process_group("gloo", timeout=timedelta(seconds=seconds))
    rank, world = dist.get_rank(), dist.get_world_size()
    out, spec = Path(out), spec or BuildSpec()
    folders = [shard_root(out) / f"rank-{r:05d}-of-{world:05d}" for r in range(world)]
    if device == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}"
    try:
        error: BaseException | None = None
        try:
            check_target(out, overwrite)  # fail before hours of featurizing, not after
            build_index(  # on --resume a finished shard with the same settings is a no-op
                checkpoints=checkpoints,
                data=data,
                out=folders[rank],
                spec=spec,
                scheduler=scheduler,
                labels=labels,
                prompts=prompts,
                base_model=base_model,
                index=index,
                target_recall=target_recall,
                device=device,
                resume=resume,
                run_records=run_records,
                overwrite=overwrite and not resume,  # --resume keeps unfinished shards
                progress=progress and rank == 0,
                shard=(rank, world),
                fidelity_sample=fidelity_sample,  # each shard measures its own rows
                data_options=data_options,
                weights=weights,
                max_memory=max_memory,
            )
        except Exception as exc:  # every rank must reach the collective, whatever happened
            error = exc
        _raise_failures(dist, rank, world, error, "building its shard")

        merged = None
        if rank == 0:
            try:
                merged = _merge(out, folders, index, target_recall, overwrite, keep_shards)
            except Exception as exc:
                error = exc
        _raise_failures(dist, rank, world, error, "merging the shards")
        return merged
    finally:
        if own_group:
            dist.destroy_process_group()


def _merge(
    out: Path,
    folders: list[Path],
    index: str,
    target_recall: float,
    overwrite: bool,
    keep_shards: bool,
) -> AttributionIndex:
    """Rank 0's part: the shard folders merged into ``out`` as ``gradindex merge`` merges them,
    then removed unless kept."""
    merged = merge_shards(
        out, folders, index=index, target_recall=target_recall, overwrite=overwrite
    )
    if not keep_shards:
        shutil.rmtree(shard_root(out))
    return merged


def _raise_failures(
    dist: Any, rank: int, world: int, error: BaseException | None, stage: str
) -> None:
    """Every rank learns every rank's outcome; each raises if any failed (its own error first)."""
    outcome = None if error is None else first_line(error)
    outcomes: list[str | None] = [None] * world
    dist.all_gather_object(outcomes, outcome)
    # every rank past the all-gather before any raises or tears its connections down: a rank
    # destroying the group while a peer still completes the gather can abort that peer (seen
    # once in CI: "terminate called without an active exception" on rank 1)
    dist.barrier()
    if error is not None:
        raise error
    failed = [(r, o) for r, o in enumerate(outcomes) if o is not None]
    if failed:
        r, o = failed[0]
        more = f" (and {len(failed) - 1} more rank(s))" if len(failed) > 1 else ""
        raise GradIndexError(f"rank {r} failed {stage}: {o}{more}")
