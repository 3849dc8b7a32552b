"""The commands that write an index folder: ``build``, ``add``, ``merge``, ``kernel`` and
``factors``. Each opens or builds through the library (imported when the command runs, so
``gradindex --help`` loads no model code) and prints the index summary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from gradindex.cli.options import (
    conditioning_options,
    data_kwargs,
    data_options,
    device_option,
    scheduler_option,
    spec_from_options,
    spec_options,
)
from gradindex.cli.output import print_info


@click.command()
@click.option(
    "--checkpoint",
    "-c",
    "checkpoints",
    multiple=True,
    required=True,
    help="A checkpoint folder: a training run's checkpoint-N (or checkpoint-N/unet), its output "
    "folder, or any diffusers pipeline or model folder. Repeat, in training order.",
)
@click.option(
    "--data",
    "-d",
    required=True,
    help="Training images: .npy/.npz, file.h5:/dataset, a folder of images, a Hugging Face "
    "dataset (save_to_disk folder, .parquet file, or a Hub folder with data/*.parquet), or tar "
    "shards ('shards-{000..009}.tar').",
)
@click.option(
    "--out", "-o", required=True, type=click.Path(file_okay=False), help="Index folder to write."
)
@scheduler_option
@click.option(
    "--config",
    default=None,
    type=click.Path(exists=True, dir_okay=False),
    help="A JSON file of BuildSpec fields; command-line options override it.",
)
@click.option(
    "--index",
    "index_kind",
    default="flat",
    show_default=True,
    help="Search index per method: flat (exact), ivf, hnsw, a FAISS factory string, ondisk (an "
    "IVF whose lists stay in a file next to the index, memory-mapped at query time: for indexes "
    "larger than RAM), or auto (ondisk when the vectors would take over half the free memory).",
)
@device_option
@click.option("--resume", is_flag=True, help="Finish an interrupted build in --out.")
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace an existing index in --out: the new one is built beside it and swapped in "
    "when complete, so the old one stays usable until then (with --resume: finish such a build "
    "that was interrupted).",
)
@click.option(
    "--shard",
    default=None,
    metavar="I/N",
    help="Build only shard I of N (a contiguous slice of the rows, numbered from 0) into --out, "
    "e.g. one job of a SLURM array; join the shards with 'gradindex merge'.",
)
@conditioning_options
@click.option(
    "--labels",
    "labels_file",
    default=None,
    type=click.Path(exists=True, dir_okay=False),
    help="Class labels of a class-conditional model, one per image (.npy, or text: one per "
    "line), when --data carries none (an .npz 'labels' array or class sub-folders).",
)
@click.option(
    "--prompts",
    "prompts_file",
    default=None,
    type=click.Path(exists=True, dir_okay=False),
    help="Captions of a text-to-image model, one per line, when --data carries none (an image "
    "folder with metadata.jsonl, or an .npz 'captions' array).",
)
@click.option(
    "--fidelity-sample",
    default=32,
    show_default=True,
    type=click.IntRange(min=0),
    help="Rows whose stored scores are checked against exact ones at the end of the build "
    "(recorded, shown by info, a warning naming a --proj-dim when below the bar); 0 skips it.",
)
@click.option(
    "--no-run-records",
    is_flag=True,
    help="Do not read the training run's TensorBoard records (by default the loss settings it "
    "logged fill the spec options left unset; see docs/methods.md).",
)
@click.option(
    "--max-memory",
    default=None,
    metavar="SIZE",
    help="Memory featurizing may take (e.g. 8G, 512M), which sets the items per gradient call; "
    "default: what the models and projections take plus 1G (at most 70% of the available "
    "memory). One sample that does not fit is an error.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the index summary as JSON.")
@click.option(
    "--weights",
    type=click.Choice(["raw", "ema"]),
    default="raw",
    show_default=True,
    help="Which weights of a diffusers training run's folders, for every checkpoint: raw (what "
    "the optimizer stepped: TracIn sums over those) or ema (an --use_ema run's averaged weights, "
    "checkpoint-N/unet_ema/ and the output folder's unet/).",
)
@data_options
@spec_options
def build(
    checkpoints: tuple[str, ...],
    data: str,
    out: str,
    scheduler: str | None,
    config: str | None,
    index_kind: str,
    device: str,
    resume: bool,
    overwrite: bool,
    shard: str | None,
    base_model: str | None,
    labels_file: str | None,
    prompts_file: str | None,
    fidelity_sample: int,
    no_run_records: bool,
    max_memory: str | None,
    as_json: bool,
    weights: str,
    **options: Any,
) -> None:
    """Build a TracIn + ReTrac index over training DATA at CHECKPOINTs.

    Under torchrun (RANK / WORLD_SIZE set) every process builds its own shard into
    OUT.shards/ and rank 0 merges them into OUT.
    """
    from gradindex.build.distributed import distributed_build, world_from_env
    from gradindex.build.pipeline import build_index
    from gradindex.errors import SpecError
    from gradindex.inputs.query_images import read_labels_file, read_prompts_file
    from gradindex.inputs.slices import parse_shard

    reading = data_kwargs(options)  # how --data is read
    spec = spec_from_options(config, options)
    cond = {
        "base_model": base_model,
        "labels": read_labels_file(labels_file) if labels_file else None,
        "prompts": read_prompts_file(prompts_file) if prompts_file else None,
    }
    common = {
        "checkpoints": list(checkpoints),
        "data": data,
        "out": out,
        "spec": spec,
        "scheduler": scheduler,
        "index": index_kind,
        "device": device,
        "resume": resume,
        "overwrite": overwrite,
        "fidelity_sample": fidelity_sample,
        "data_options": reading or None,
        "run_records": not no_run_records,
        "weights": weights,
        "max_memory": max_memory,
    }
    if world_from_env() is not None:
        if shard:
            raise SpecError("--shard and a torchrun launch both split the rows; use one of them")
        merged = distributed_build(**cond, **common)
        if merged is not None:  # rank 0
            print_info(merged.info(), as_json)
        return
    idx = build_index(**cond, shard=parse_shard(shard) if shard else None, **common)
    print_info(idx.info(), as_json)


@click.command()
@click.argument("out", type=click.Path(file_okay=False))
@click.argument("shard_dirs", nargs=-1, required=True, type=click.Path())
@click.option(
    "--index",
    "index_kind",
    default=None,
    help="Search index per method for the merged index (default: what the shards were built "
    "with --index for): flat, ivf, hnsw, ondisk, auto, or a FAISS factory string.",
)
@click.option("--target-recall", type=float, default=None, help="recall@10 for approximate kinds.")
@click.option("--overwrite", is_flag=True, help="Replace an existing index in OUT.")
@click.option("--json", "as_json", is_flag=True, help="Print the index summary as JSON.")
def merge(
    out: str,
    shard_dirs: tuple[str, ...],
    index_kind: str | None,
    target_recall: float | None,
    overwrite: bool,
    as_json: bool,
) -> None:
    """Merge the SHARD_DIRS of 'gradindex build --shard I/N' into one index OUT.

    Checks the shards share spec, checkpoints and model and cover the dataset exactly once;
    rows end up in dataset order.
    """
    from gradindex.build.shards import merge_shards

    idx = merge_shards(
        out, list(shard_dirs), index=index_kind, target_recall=target_recall, overwrite=overwrite
    )
    print_info(idx.info(), as_json)


@click.command()
@click.argument("index_dir", type=click.Path())
@click.argument("data")
@click.option(
    "--checkpoint",
    "-c",
    "checkpoints",
    multiple=True,
    help="Checkpoint folders to use instead of the ones recorded in the index (same weights). "
    "Repeat, in training order.",
)
@scheduler_option
@device_option
@click.option(
    "--data-range",
    type=(float, float),
    default=None,
    metavar="LOW HIGH",
    help="Value range of float DATA (mapped to the model's [-1, 1]; refused for uint8, which is "
    "0..255). Default: told from DATA's values as build does, whatever the index's own range.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the index summary as JSON.")
def add(
    index_dir: str,
    data: str,
    checkpoints: tuple[str, ...],
    scheduler: str | None,
    device: str,
    data_range: tuple[float, float] | None,
    as_json: bool,
) -> None:
    """Append the training images in DATA to the finished index INDEX_DIR.

    Same spec and checkpoints as the index; ids must not collide (image files keep their names,
    array rows continue the index's numbering). The index is replaced in one step at the end, so
    an interrupted add leaves it as it was.
    """
    from gradindex.build.append import add_samples

    idx = add_samples(
        index_dir,
        data,
        checkpoints=list(checkpoints) or None,
        scheduler=scheduler,
        device=device,
        data_range=data_range,
    )
    print_info(idx.info(), as_json)


@click.command()
@click.argument("index_dir", type=click.Path())
@click.option(
    "--exact",
    is_flag=True,
    help="Keep every eigenpair of the Grams: exact scores wherever the default keeps only the "
    "top ones; kernel.h5 up to the rows' own size and slower kernel queries.",
)
def kernel(index_dir: str, exact: bool) -> None:
    """Compute the kernel of INDEX_DIR (eigen factors of the per-checkpoint Grams of its TracIn
    and ReTrac rows, kernel.h5), which '--method trak' / 'retrak' need: for indexes built
    before builds computed it, a damaged kernel.h5, or one in the dense format of older builds.

    Checks every other file's checksum first, then records the new file in the manifest."""
    from gradindex.search.kernel_recall import add_kernel
    from gradindex.store.describe import kernel_line, kernel_search_line
    from gradindex.store.layout import read_manifest
    from gradindex.store.lifecycle import folder_lock

    read_manifest(Path(index_dir))  # no finished index here: said before our own lock is taken
    with folder_lock(Path(index_dir).resolve()):  # one writer per folder, as build/add/merge
        record = add_kernel(index_dir, exact=exact)
    click.echo(f"kernel       {kernel_line(record)}")
    if kernel_search_line(record):
        click.echo(f"kernel search {kernel_search_line(record)}")


@click.command()
@click.argument("index_dir", type=click.Path())
@click.option("--data", required=True, help="The training images (same formats as build's).")
@click.option("--samples", type=int, default=None, help="Estimate from a random sample of them.")
@click.option("--seed", type=int, default=0, show_default=True, help="Sample and draw seed.")
def factors(index_dir: str, data: str, samples: int | None, seed: int) -> None:
    """Compute the EK-FAC influence factors of INDEX_DIR (factors.h5), which '--method
    influence' needs: two passes over (a sample of) the training data per checkpoint.

    Checks every other file's checksum first, then records the new file in the manifest."""
    from gradindex.inputs.query_images import query_inputs
    from gradindex.query import AttributionIndex
    from gradindex.query_influence import add_factors
    from gradindex.store.layout import read_manifest
    from gradindex.store.lifecycle import folder_lock

    read_manifest(Path(index_dir))  # no finished index here: said before our own lock is taken
    with folder_lock(Path(index_dir).resolve()):  # one writer per folder, as build/add/merge
        idx = AttributionIndex.open(index_dir)
        arr, _, cond = query_inputs(data, idx.image_shape[0], idx.conditioning["kind"])
        record = add_factors(idx, arr, samples=samples, seed=seed, **cond)
    click.echo(
        f"factors      {record['factored_layers']} K-FAC layers + {record['diagonal_parameters']} "
        f"diagonal parameters per checkpoint, from {record['samples']} samples"
    )
