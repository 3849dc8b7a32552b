"""The ``gradindex`` command line: thin commands over the library.

Holds the click group and its commands (``build``, ``query``, ``info``, ``export``, ``demo``...). Each command
opens the library object, calls it and prints; every ``GradIndexError`` becomes a one-line
``Error: ...`` and exit code 1 in one place (``_Group.invoke``).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import warnings
from pathlib import Path
from typing import Any

import click
import numpy as np

from gradindex.errors import GradIndexError
from gradindex.spec import (
    LATENT_MODES,
    LOSS_WEIGHTINGS,
    LOSSES,
    PRECONDITIONERS,
    RESIZE_MODES,
    SPEC_PROJECTIONS,
    STORE_DTYPES,
    BuildSpec,
)


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", UserWarning)
                try:
                    return super().invoke(ctx)
                finally:
                    for w in caught:
                        if not str(w.message).startswith("There is a performance drop"):
                            click.echo(f"Warning: {w.message}", err=True)
        except GradIndexError as exc:
            raise click.ClickException(str(exc).splitlines()[0]) from None
        except (FileNotFoundError, PermissionError, IsADirectoryError) as exc:
            raise click.ClickException(f"{exc.filename}: {exc.strerror}") from None
        except OSError as exc:
            raise click.ClickException(f"{exc.strerror or exc}") from None
        except KeyboardInterrupt:
            hint = _INTERRUPTED.get(ctx.invoked_subcommand or "")
            raise click.ClickException("interrupted" + (f"; {hint}" if hint else "")) from None


# what a Ctrl-C leaves, by command (a killed build keeps its committed rows; add / merge swap
# the new index in only when it is complete)
_INTERRUPTED = {
    "build": "the rows written so far are kept: run the same command with --resume to finish",
    "add": "the index is as it was before the add",
    "merge": "nothing was replaced; run the merge again",
}


@click.group(cls=_Group)
@click.version_option(package_name="gradindex")
def main() -> None:
    """gradindex: a vector-search index for training-data attribution in diffusion models.

    Build once (per-sample gradients at fixed timesteps and noise draws, projected and stored),
    then ask which training images made the model produce an image, by Diffusion-TracIn or
    Diffusion-ReTrac score, in milliseconds.

    \b
    Start with:  gradindex demo --out demo_out
    """


# -- spec options generated from BuildSpec fields, so its docs are the CLI's help -----------

_CHOICES = {
    "projection": SPEC_PROJECTIONS,
    "loss": LOSSES,
    "store_dtype": STORE_DTYPES,
    "resize": RESIZE_MODES,
    "latents": LATENT_MODES,
    "precondition": PRECONDITIONERS,
    "snr_weighting": LOSS_WEIGHTINGS,
}
_FLOATS = ("snr_gamma", "noise_offset", "input_perturbation")
_SKIP = {"num_train_timesteps"}


def _conditioning_options(func: Any) -> Any:
    return click.option(
        "--base-model",
        default=None,
        type=click.Path(exists=True, file_okay=False),
        help="Stable-Diffusion-layout folder with vae/, text_encoder/, tokenizer/ (and unet/ "
        "for LoRA checkpoints), when the checkpoint folders and their parent hold none.",
    )(func)


_DATA_OPTIONS = {  # how --data is read (gradindex.inputs.training_data.open_source's keywords)
    "image_column": "Image column of a Hugging Face dataset / parquet --data (default: the "
    "first of image, img, pixel_values).",
    "caption_column": "Caption column of a dataset --data (default: text, caption, ...).",
    "label_column": "Class-label column of a dataset --data (default: label, labels, ...).",
    "id_column": "Id column of a dataset --data (default: the row number).",
    "split": "Split of a saved DatasetDict --data (default: train).",
}


def _data_options(func: Any) -> Any:
    """--image-column ... --split and --on-error: collected by ``_data_kwargs``."""
    func = click.option(
        "--on-error",
        type=click.Choice(["raise", "skip"]),
        default="raise",
        show_default=True,
        help="A corrupt image or truncated tar member in --data: stop naming it (raise), or "
        "leave it out and list it (skip; every sample is decoded once up front).",
    )(func)
    for name, help_text in reversed(_DATA_OPTIONS.items()):
        func = click.option("--" + name.replace("_", "-"), name, default=None, help=help_text)(func)
    return func


def _data_kwargs(options: dict[str, Any]) -> dict[str, Any]:
    """Pop the --data reading options from a command's keyword arguments (given ones only)."""
    given = {k: options.pop(k) for k in (*_DATA_OPTIONS, "on_error")}
    return {k: v for k, v in given.items() if v is not None and (k, v) != ("on_error", "raise")}


# options shared by the commands that featurize (build, add)
_scheduler_option = click.option(
    "--scheduler",
    default=None,
    type=click.Path(exists=True, file_okay=False),
    help="Noise-scheduler folder; when given it is used instead of the run's own scheduler/ "
    "(found beside the checkpoint or in the run's output folder).",
)
_device_option = click.option(
    "--device",
    default="cpu",
    show_default=True,
    help="torch device for gradients: cpu, cuda, cuda:N, or auto (a GPU when there is one).",
)


def _spec_options(func: Any) -> Any:
    for f in reversed(dataclasses.fields(BuildSpec)):
        if f.name in _SKIP:
            continue
        name = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        if f.name in _CHOICES:
            opt = click.option(
                name, type=click.Choice(_CHOICES[f.name]), default=None, help=help_text
            )
        elif f.name in ("timesteps", "checkpoint_weights"):
            opt = click.option(name, type=str, default=None, help=help_text + " Comma-separated.")
        elif f.name == "params":
            opt = click.option(name, type=str, multiple=True, help=help_text + " Repeatable.")
        elif f.name == "data_range":
            opt = click.option(name, type=(float, float), default=None, help=help_text)
        elif f.name in _FLOATS:
            alone = " Given alone: --snr-weighting min_snr." if f.name == "snr_gamma" else ""
            opt = click.option(name, type=float, default=None, help=help_text + alone)
        elif f.name == "center_crop":
            opt = click.option(name, is_flag=True, default=None, help=help_text)
        else:
            opt = click.option(name, type=int, default=None, help=help_text)
        func = opt(func)
    return func


def _read_config(config: str) -> dict[str, Any]:
    """The BuildSpec fields of a --config JSON file; any problem with it names the file."""
    from gradindex.errors import SpecError

    try:
        text = Path(config).read_text()
        return BuildSpec.from_json(text).to_dict()
    except UnicodeDecodeError:
        raise SpecError(f"--config {config}: not a text (JSON) file") from None
    except TypeError as exc:  # a value of the wrong kind: name its field
        fields = json.loads(text)
        bad = [k for k in fields if _type_error(k, fields[k])] or ["?"]
        raise SpecError(f"--config {config}: field {bad[0]!r} has the wrong type ({exc})") from None
    except (GradIndexError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SpecError(f"--config {config}: {first}") from None


def _type_error(name: str, value: Any) -> bool:
    try:
        BuildSpec.from_dict({name: value})
    except TypeError:
        return True
    except (GradIndexError, ValueError):
        pass
    return False


def _spec_from_options(config: str | None, options: dict[str, Any]) -> BuildSpec:
    base = _read_config(config) if config else {}
    for f in dataclasses.fields(BuildSpec):
        value = options.pop(f.name, None)
        if value is None or value == ():
            continue
        if f.name == "timesteps":
            parts = [p for p in value.split(",") if p.strip()]
            value = int(parts[0]) if len(parts) == 1 else [int(p) for p in parts]
        elif f.name == "checkpoint_weights":
            value = "auto" if value.strip() == "auto" else _numbers(value, "--checkpoint-weights")
        elif f.name == "params":
            value = list(value)
        base[f.name] = value
    if base.get("snr_gamma") is not None and base.get("snr_weighting", "none") == "none":
        base["snr_weighting"] = "min_snr"  # --snr-gamma alone: the scripts' min-SNR weighting
    return BuildSpec.from_dict(base)


def _numbers(text: str, option: str) -> list[float]:
    """Comma-separated numbers of an option, or a SpecError naming it."""
    from gradindex.errors import SpecError

    try:
        return [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise SpecError(f"{option} {text!r}: give comma-separated numbers or 'auto'") from None


@main.command()
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
@_scheduler_option
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
@_device_option
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
@_conditioning_options
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
@_data_options
@_spec_options
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
    **spec_options: Any,
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

    data_options = _data_kwargs(spec_options)
    spec = _spec_from_options(config, spec_options)
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
        "data_options": data_options or None,
        "run_records": not no_run_records,
        "weights": weights,
        "max_memory": max_memory,
    }
    if world_from_env() is not None:
        if shard:
            raise SpecError("--shard and a torchrun launch both split the rows; use one of them")
        merged = distributed_build(**cond, **common)
        if merged is not None:  # rank 0
            _print_info(merged.info(), as_json)
        return
    idx = build_index(**cond, shard=parse_shard(shard) if shard else None, **common)
    _print_info(idx.info(), as_json)


def _factors_line(info: dict[str, Any]) -> str:
    """gradindex info's line about the influence factors."""
    fac = info.get("factors")
    if not fac:
        return (
            f"none; add them for --method influence with: gradindex factors {info['path']} "
            "--data TRAINING_DATA"
        )
    return (
        f"EK-FAC, {fac['factored_layers']} K-FAC layers + {fac['diagonal_parameters']} diagonal "
        f"parameters, from {fac['samples']} samples (--method influence)"
    )


def _kernel_line(record: dict[str, Any]) -> str:
    """The manifest's kernel record in one line: rows, each kernel method's λ, the rule."""
    lams = "; ".join(
        f"{m} lambda " + ", ".join(f"{v:.4g}" for v in record[key])
        for m, key in (("trak", "lambda"), ("retrak", "lambda_retrac"))
        if key in record
    )
    rank, exact = record.get("rank") or {}, record.get("exact") or {}
    form = ", ".join(
        f"{m} rank {rank[r]} "
        + ("(exact)" if exact.get(r) else "(top eigenpairs, rest by their mean)")
        for m, r in (("trak", "tracin"), ("retrak", "retrac"))
        if r in rank
    )
    if not form:
        form = "dense Grams (format 1; convert with: gradindex kernel DIR)"
    return f"factors of {record['rows']} rows: {form}; {lams} ({record['rule']})"


def _kernel_search_line(record: dict[str, Any]) -> str | None:
    """Each kernel method's recall@10 through its search index, measured when the kernel was
    written, and whether it searches exactly; None for a kernel written before it was."""
    search = record.get("search")
    if not search:
        return None
    return "; ".join(
        f"{m}: recall@10 {s['recall_at_10']:.3f} (target {s['target_recall']:g}), "
        + ("exact search" if s["exact_search"] else "approximate search")
        for m, s in sorted(search.items(), key=lambda item: item[0] != "trak")
    )


_moved_checkpoints = click.option(
    "--checkpoint",
    "-c",
    "checkpoints",
    multiple=True,
    help="The index's checkpoint folders, when they moved since the build: once per "
    "checkpoint, in build order (each is checked against the fingerprint the index recorded).",
)


@main.command()
@click.argument("index_dir", type=click.Path())
@click.argument("images")
@_moved_checkpoints
@click.option(
    "-k", "k", default=10, show_default=True, type=int, help="How many training samples per query."
)
@click.option(
    "--method",
    type=click.Choice(["tracin", "retrac", "trak", "retrak", "influence", "both", "all"]),
    default="both",
    show_default=True,
    help="both: tracin and retrac; all: also trak (TRAK, the TracIn rows kernel-corrected) and "
    "retrak (the ReTrac rows kernel-corrected); both kernel methods need the index's kernel, "
    "see 'gradindex kernel'. influence: EK-FAC influence functions on the TracIn rows (needs "
    "the index's factors, see 'gradindex factors').",
)
@click.option(
    "--lambda",
    "lambdas",
    type=float,
    multiple=True,
    help="trak's / retrak's ridge lambda: once for every checkpoint or once per checkpoint "
    "(default: the index's, s * trace(G_c) / d, see 'gradindex info'); influence's damping: "
    "lambda_l / mean eigenvalue of each layer (default 0.1).",
)
@click.option("--exact", is_flag=True, help="Force exact search (ignore approximate indexes).")
@click.option(
    "--vectors",
    "from_vectors",
    is_flag=True,
    help="IMAGES holds query vectors instead: .npy [B, D] (used for every method) or .npz "
    "with 'tracin' / 'retrac' arrays (as written by idx.embed; trak uses 'tracin', retrak "
    "'retrac').",
)
@click.option(
    "--output",
    "-o",
    "output",
    default=None,
    type=click.Path(dir_okay=False),
    help="Write results to a file instead of the terminal: .jsonl (one record per query "
    "and method) or .npz (<method>_scores, <method>_rows, <method>_ids arrays).",
)
@click.option(
    "--label",
    "labels",
    multiple=True,
    help="Class-conditional index: the class of the query images (a number, or a class "
    "sub-folder name); once for all images or once per image. Default: from IMAGES (an .npz "
    "'labels' array or class sub-folders).",
)
@click.option(
    "--prompt",
    "prompts",
    multiple=True,
    help="Text-to-image index: the prompt of the query images; once for all images or once per "
    "image. Default: from IMAGES (metadata.jsonl or an .npz 'captions' array).",
)
@click.option(
    "--prompt-file",
    default=None,
    type=click.Path(exists=True, dir_okay=False),
    help="Text-to-image index: prompts, one per line, one per query image.",
)
@_conditioning_options
@click.option(
    "--milvus",
    default=None,
    metavar="URI",
    help="Search the Milvus collections 'gradindex export INDEX_DIR --milvus URI' made, instead "
    "of the local FAISS indexes (token: env MILVUS_TOKEN).",
)
@click.option(
    "--milvus-name",
    default=None,
    help="Collection-name prefix given to 'export --name' (default: the index folder's name).",
)
@click.option(
    "--data-range",
    type=(float, float),
    default=None,
    metavar="LOW HIGH",
    help="Value range of float IMAGES (mapped to the model's [-1, 1]; refused for uint8 images, "
    "which are 0..255). Default, for each image on its own: uint8 → 0..255, floats within "
    "[0, 1] or [-1, 1] → that range, wider floats → the index's recorded range; a batch whose "
    "images come out in different ranges is refused.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON record per query and method.")
def query(
    index_dir: str,
    images: str,
    checkpoints: tuple[str, ...],
    k: int,
    method: str,
    lambdas: tuple[float, ...],
    exact: bool,
    from_vectors: bool,
    output: str | None,
    labels: tuple[str, ...],
    prompts: tuple[str, ...],
    prompt_file: str | None,
    base_model: str | None,
    milvus: str | None,
    milvus_name: str | None,
    data_range: tuple[float, float] | None,
    as_json: bool,
) -> None:
    """Top-k training samples for each test image in IMAGES (same formats as --data).

    Thousands of queries are fine: embedding and search run in batches. Images of another
    size than the model's are resized with a warning, and their records say "resized"."""
    from gradindex.inputs.query_images import read_prompts_file
    from gradindex.query import SEARCH_METHODS, AttributionIndex, stored_method
    from gradindex.query_influence import check_factors
    from gradindex.search.backend import check_k
    from gradindex.store.kernel import KERNEL_METHODS

    check_k(k)  # before opening and embedding anything
    if output and not output.endswith((".jsonl", ".npz")):
        raise click.ClickException(
            f"--output {output}: give a .jsonl (one JSON record per query and method) or .npz "
            "(arrays) file; no other format is written"
        )
    if prompts and prompt_file:
        raise click.BadParameter("give --prompt or --prompt-file, not both", param_hint="--prompt")
    if from_vectors and (labels or prompts or prompt_file):
        raise click.BadParameter("query vectors are already conditioned", param_hint="--vectors")
    if from_vectors and data_range:
        raise click.BadParameter("query vectors are already embedded", param_hint="--data-range")
    every = [m for m in SEARCH_METHODS if m != "influence"]  # influence needs its factors
    methods = {"both": ["tracin", "retrac"], "all": every}.get(method, [method])
    if lambdas and not set(methods) & {*KERNEL_METHODS, "influence"}:
        raise click.BadParameter(
            "applies to --method trak / retrak / influence (or all) only", param_hint="--lambda"
        )
    lam = None if not lambdas else lambdas[0] if len(lambdas) == 1 else list(lambdas)
    if milvus_name and not milvus:
        raise click.BadParameter("needs --milvus URI", param_hint="--milvus-name")
    backend = None
    if milvus:
        from gradindex.search.milvus import MilvusBackend, default_name

        backend = MilvusBackend.connect(milvus, milvus_name or default_name(index_dir))
    idx = AttributionIndex.open(
        index_dir, checkpoints=list(checkpoints) or None, base_model=base_model, milvus=backend
    )
    for m in set(methods) & set(KERNEL_METHODS):
        idx.check_kernel(m, lam)
    if "influence" in methods:
        check_factors(idx, lam)
    one_or_all = lambda v: (v[0] if len(v) == 1 else list(v)) if v else None  # noqa: E731
    cond = {
        "labels": one_or_all(labels),
        "prompts": read_prompts_file(prompt_file) if prompt_file else one_or_all(prompts),
    }
    key = lambda m: m if m == "influence" else stored_method(m)  # noqa: E731
    stored = list(dict.fromkeys(key(m) for m in methods))  # trak: the TracIn rows, ...
    vecs, names, resized = _query_vectors(
        idx, images, stored, from_vectors, cond, data_range, lam if "influence" in methods else None
    )
    results = {
        m: dataclasses.replace(
            idx.search(vecs[key(m)], k, m, exact=exact, lam=lam if m in KERNEL_METHODS else None),
            resized=resized,
        )
        for m in methods
    }
    _write_results(results, names, resized, output, as_json)


def _write_results(
    results: dict[str, Any],
    names: np.ndarray,
    resized: tuple[int, int] | None,
    output: str | None,
    as_json: bool,
) -> None:
    """Query results to --output (.npz arrays or .jsonl records) or the terminal (one line, or
    with --json one record, per query and method)."""
    from gradindex.query import result_to_json

    if output and output.endswith(".npz"):
        arrays = {}
        for m, res in results.items():
            arrays.update({f"{m}_scores": res.scores, f"{m}_rows": res.rows, f"{m}_ids": res.ids})
        if resized is not None:  # the queries' [H, W] before they were resized
            arrays["resized"] = np.asarray(resized, dtype=np.int64)
        np.savez(output, query=names, **arrays)
        click.echo(f"wrote {len(names)} queries x {len(results)} method(s) to {output}")
        return
    lines = []
    for m, res in results.items():
        for name, rec in zip(names, result_to_json(res, m), strict=True):
            rec["query"] = name.item() if hasattr(name, "item") else name
            if as_json or output:
                lines.append(json.dumps(rec))
            else:
                pairs = ", ".join(
                    f"{i}:{s:.4g}" for i, s in zip(rec["ids"], rec["scores"], strict=True)
                )
                lines.append(f"{m:6s} query {rec['query']}: {pairs}")
    if output:
        Path(output).write_text("\n".join(lines) + "\n")
        click.echo(f"wrote {len(lines)} records to {output}")
    else:
        click.echo("\n".join(lines))


def _query_vectors(
    idx: Any,
    source: str,
    methods: list[str],
    from_vectors: bool,
    cond: dict[str, Any],
    data_range: tuple[float, float] | None = None,
    damping: float | None = None,
) -> tuple[dict[str, np.ndarray], np.ndarray, tuple[int, int] | None]:
    """{method: [B, D]}, the query names, and the images' (H, W) if they were resized (else
    None), from images or from stored vectors ('influence': its own rows, ``damping``)."""
    from gradindex.errors import DataError
    from gradindex.inputs.files import read_array, read_npz
    from gradindex.inputs.query_images import query_inputs

    if not from_vectors:  # labels / captions: the given ones, else what the images carry
        kind = idx.conditioning["kind"]
        from gradindex.inputs.prepare import preparer

        fit = preparer(idx.spec.resolution, idx.spec.center_crop)  # as the training images
        arr, names, cond = query_inputs(source, idx.image_shape[0], kind, **cond, fit=fit)
        vecs = idx.embed(arr, **cond, data_range=data_range) if set(methods) - {"influence"} else {}
        if "influence" in methods:
            from gradindex.query_influence import embed_influence

            vecs["influence"] = embed_influence(idx, arr, damping, data_range=data_range, **cond)
        return vecs, names, idx.resized_from(arr)
    path = Path(source)
    if not path.exists():
        raise DataError(f"{source}: no such file")
    if path.suffix == ".npz":
        vecs = read_npz(path, methods)
    elif path.suffix == ".npy":
        if "influence" in methods:  # its rows are preconditioned, unlike any embed() rows
            raise DataError(
                f"{source}: --method influence needs its own query rows (an .npz with an "
                "'influence' array from gradindex.query_influence.embed_influence), or images"
            )
        arr = read_array(path)
        vecs = {m: arr for m in methods}
    else:
        raise DataError(f"{source}: query vectors must be .npy or .npz")
    for m, v in vecs.items():
        if np.ndim(v) != 2 or not np.isrealobj(v):
            raise DataError(
                f"{source}: query vectors ({m}) have shape {np.shape(v)} and dtype "
                f"{np.asarray(v).dtype}; give a real [B, D] array (one vector: x[None])"
            )
    n = len(next(iter(vecs.values())))
    return vecs, np.arange(n), None


@main.command()
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
    _print_info(idx.info(), as_json)


@main.command()
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
@_scheduler_option
@_device_option
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
    _print_info(idx.info(), as_json)


@main.command()
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
    from gradindex.store.lifecycle import folder_lock

    with folder_lock(Path(index_dir).resolve()):  # one writer per folder, as build/add/merge
        record = add_kernel(index_dir, exact=exact)
    click.echo(f"kernel       {_kernel_line(record)}")
    if _kernel_search_line(record):
        click.echo(f"kernel search {_kernel_search_line(record)}")


@main.command()
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
    from gradindex.store.lifecycle import folder_lock

    with folder_lock(Path(index_dir).resolve()):  # one writer per folder, as build/add/merge
        idx = AttributionIndex.open(index_dir)
        arr, _, cond = query_inputs(data, idx.image_shape[0], idx.conditioning["kind"])
        record = add_factors(idx, arr, samples=samples, seed=seed, **cond)
    click.echo(
        f"factors      {record['factored_layers']} K-FAC layers + {record['diagonal_parameters']} "
        f"diagonal parameters per checkpoint, from {record['samples']} samples"
    )


@main.command()
@click.argument("index_dir", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the full manifest summary as JSON.")
@click.option("--verify", is_flag=True, help="Recompute file checksums against the manifest.")
def info(index_dir: str, as_json: bool, verify: bool) -> None:
    """Describe an index: rows, dimensions, spec, checkpoints, search settings."""
    from gradindex.query import AttributionIndex
    from gradindex.store.layout import check_files, read_manifest

    if verify:  # before opening, so a corrupted file is named rather than half-loaded
        path = Path(index_dir)
        problems = check_files(path, read_manifest(path), checksums=True)
        if problems:
            raise click.ClickException("; ".join(problems))
    idx = AttributionIndex.open(index_dir)
    _print_info(idx.info(), as_json)
    if verify and not as_json:
        click.echo(f"verified     {len(idx.manifest['files'])} files match their checksums")


@main.command()
@click.argument("index_dir", type=click.Path())
@click.option(
    "--milvus",
    "uri",
    required=True,
    metavar="URI",
    help="Milvus to load into: http://host:19530 (a server or cluster) or a local path "
    "ending in .db (Milvus Lite).",
)
@click.option(
    "--name",
    default=None,
    help="Collection-name prefix: collections NAME_tracin and NAME_retrac "
    "(default: the index folder's name).",
)
@click.option(
    "--kind",
    type=click.Choice(["flat", "ivf"]),
    default="flat",
    show_default=True,
    help="Milvus index: flat (exact) or ivf (IVF_FLAT, nprobe tuned to --target-recall).",
)
@click.option(
    "--target-recall", type=float, default=0.95, show_default=True, help="recall@10 for --kind ivf."
)
@click.option("--overwrite", is_flag=True, help="Replace collections of the same name.")
@click.option(
    "--token",
    envvar="MILVUS_TOKEN",
    default=None,
    help="user:password or API key of the Milvus server (env MILVUS_TOKEN).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the export record as JSON.")
def export(
    index_dir: str,
    uri: str,
    name: str | None,
    kind: str,
    target_recall: float,
    overwrite: bool,
    token: str | None,
    as_json: bool,
) -> None:
    """Load the finished index INDEX_DIR into Milvus, one collection per method.

    TracIn: inner product (FLAT or IVF_FLAT); ReTrac: cosine, its scores scaled back to the
    inner products FAISS gives. Each collection is checked against exact FAISS search.
    Then: gradindex query INDEX_DIR IMAGES --milvus URI.
    """
    from gradindex.search.milvus import export_index

    rec = export_index(
        index_dir,
        uri,
        name=name,
        kind=kind,
        overwrite=overwrite,
        target_recall=target_recall,
        token=token,
    )
    if as_json:
        click.echo(json.dumps(rec, indent=2, sort_keys=True))
        return
    for m, c in rec["collections"].items():
        knobs = f", nlist {c['nlist']}, nprobe {c['nprobe']}" if c["kind"] == "ivf" else ""
        click.echo(
            f"{m:6s} -> {c['collection']} in {rec['uri']}: {c['rows']} rows, {c['metric']} on "
            f"{c['kind']}{knobs}, recall@10 {c['recall_at_10']:.3f} vs exact FAISS"
        )


@main.command()
@click.argument("index_dir", type=click.Path())
@click.option(
    "--queries",
    default=None,
    help="Test images to query (same formats as --data); "
    "default: a sample of the training rows, each with its own match dropped.",
)
@click.option("-k", "k", default=10, show_default=True, type=int)
@click.option(
    "--figures",
    default=None,
    type=click.Path(file_okay=False),
    help="Folder for PNG figures (norms by timestep, reach vs norm).",
)
@click.option("--json", "as_json", is_flag=True, help="Print every diagnostic as JSON.")
def report(index_dir: str, queries: str | None, k: int, figures: str | None, as_json: bool) -> None:
    """Diagnostics of an index: the timestep bias of gradient norms, generally influential
    samples under TracIn vs ReTrac, self-retrieval (a summary; --json for every number)."""
    from gradindex.eval.report import format_report
    from gradindex.eval.report import report as make_report
    from gradindex.inputs.query_images import load_images
    from gradindex.query import AttributionIndex
    from gradindex.search.backend import check_k

    check_k(k)
    idx = AttributionIndex.open(index_dir)
    images = load_images(queries, channels=idx.image_shape[0])[0] if queries else None
    result = make_report(idx, images, k=k, out_dir=Path(figures) if figures else None)
    if as_json:
        click.echo(json.dumps(result, indent=2, sort_keys=True, default=_json_default))
    else:
        click.echo("\n".join(format_report(result)))


@main.command()
@click.option(
    "--out",
    "-o",
    default="demo_out",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Folder for the trained model, the index, the pictures and summary.json.",
)
@click.option("--quick", is_flag=True, help="Tiny settings that finish in seconds (a smoke test).")
def demo(out: str, quick: bool) -> None:
    """Train a small DDPM on scikit-learn's digits, index it, attribute new samples.

    Reuses a finished training run and index found in --out. Writes attribution.png,
    timestep_norms.png and summary.json to --out.
    """
    from gradindex.demo.run import DemoSettings, format_summary, run_demo

    summary = run_demo(out, DemoSettings.quick() if quick else DemoSettings())
    click.echo(format_summary(summary))
    click.echo(f"pictures: {Path(out) / 'attribution.png'}, {Path(out) / 'timestep_norms.png'}")
    click.echo(f"browse: gradindex serve {Path(out) / 'index'} --data {Path(out) / 'train.npy'}")


@main.command()
@click.argument("index_dir", type=click.Path())
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, type=int)
@click.option(
    "--data",
    default=None,
    help="The training images (as given to build --data) when the recorded source moved or "
    "the index was built from an in-memory array; used for thumbnails only.",
)
@click.option(
    "--results",
    default=None,
    type=click.Path(exists=True, dir_okay=False),
    help="A 'gradindex query --output' .jsonl to open in the results viewer.",
)
@click.option("--max-upload-mb", default=16, show_default=True, type=click.IntRange(1, 1024))
@_moved_checkpoints
def serve(
    index_dir: str,
    host: str,
    port: int,
    data: str | None,
    results: str | None,
    max_upload_mb: int,
    checkpoints: tuple[str, ...],
) -> None:
    """Browse attributions in a web browser: upload a query image, see the top-k training
    images of every method side by side (read-only; needs the 'serve' extra)."""
    try:
        import uvicorn

        from gradindex.serve.app import create_app
        from gradindex.serve.limits import Limits
    except ImportError as exc:
        raise click.ClickException(
            f"gradindex serve needs the web extra ({exc.name} is missing): "
            "pip install 'gradindex[serve]'"
        ) from None
    from gradindex.serve.guard import LOOPBACK_HOSTS

    loopback = host.strip("[]") in LOOPBACK_HOSTS  # IPv4 or IPv6: only loopback Host headers
    if not loopback:
        click.echo(f"warning: listening on {host}: anyone who can reach it can query the index")
    from gradindex.query import AttributionIndex

    index = AttributionIndex.open(index_dir, checkpoints=list(checkpoints) or None)
    app = create_app(index, data=data, results=results,
                     limits=Limits(max_upload_bytes=max_upload_mb * 2**20),
                     hosts=list(LOOPBACK_HOSTS) if loopback else None)  # fmt: skip
    click.echo(f"gradindex serve: http://{host}:{port}/  (Ctrl-C stops it)")
    if app.state.start_results:
        click.echo(f"results: http://{host}:{port}/results/{app.state.start_results}")
    uvicorn.run(app, host=host, port=port, log_level="warning")


def _print_info(info: dict[str, Any], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(info, indent=2, sort_keys=True, default=_json_default))
        return
    click.echo("\n".join(format_info(info)))


# keys of AttributionIndex.info() that format_info lays out itself; any other key is rendered
# generically, so a key added later still shows
_INFO_KEYS = {
    "path",
    "weights",
    "num_rows",
    "num_flagged",
    "dim",
    "proj_dim",
    "num_params",
    "layers",
    "featurize",
    "checkpoints",
    "timesteps",
    "prediction_type",
    "spec",
    "indexes",
    "versions",
    "build_seconds",
    "data_seconds",
    "conditioning",
    "fidelity",
    "kernel",
    "run_records",
    "factors",
}


def format_info(info: dict[str, Any]) -> list[str]:
    """``AttributionIndex.info()`` for people: one aligned line per fact (``--json``: all)."""
    spec = info["spec"]
    lines: list[str] = []

    def add(label: str, text: str) -> None:
        lines.append(f"{label:<12s} {text}")

    add("index", info["path"])
    add("rows", f"{info['num_rows']} ({info['num_flagged']} flagged, left out of search)")
    add("dim", f"{info['dim']} = {len(info['checkpoints'])} checkpoint(s) x {info['proj_dim']}")
    chosen = f"{', '.join(spec['params'])}; " if spec.get("params") else ""
    projection = f"{spec['projection']} projection, seed {spec['proj_seed']}"
    if (info.get("featurize") or {}).get("path") == "streamed":
        projection += ", streamed per layer"
    add("params", f"{info['num_params']:,} ({chosen}{projection})")
    if spec["projection"] == "kronecker":
        for name, route in (info.get("layers") or {}).items():
            add("layer", f"{name}: {route}")
    ts = info["timesteps"]
    draws = f"{spec['noise_draws']} noise draw{'s' if spec['noise_draws'] != 1 else ''}"
    add("draws", f"{len(ts)} timesteps x {draws} (seed {spec['seed']}), loss {spec['loss']}")
    add("timesteps", _short_list(ts))
    lo, hi = spec.get("data_range") or (None, None)
    data = f"data range [{lo:g}, {hi:g}]" if lo is not None else "data range from the data"
    add(
        "model", f"predicts {info['prediction_type']}, {data}, rows stored as {spec['store_dtype']}"
    )
    cond = info.get("conditioning") or {"kind": "none"}
    if cond["kind"] != "none" or cond.get("latent"):
        extra = [f"{cond['num_classes']} classes"] if cond["kind"] == "class" else []
        if cond.get("latent"):
            extra.append(f"VAE latents ({cond['latents']}, x{cond['scaling_factor']:g})")
        add("conditioning", f"{cond['kind']}  {', '.join(extra)}".rstrip())
    for c in info["checkpoints"]:
        add("checkpoint", f"{c['source']}  w={c['weight']:g}  {c['fingerprint']}")
    for label, text in _trained_lines(spec, info.get("run_records") or {}):
        add(label, text)
    if info.get("weights") in _WEIGHTS_LINE and any(c.get("weights") for c in info["checkpoints"]):
        add("weights", _WEIGHTS_LINE[info["weights"]])  # a training run's folders: which kind
    if info.get("fidelity"):
        from gradindex.featurize.fidelity import format_fidelity

        add("fidelity", format_fidelity(info["fidelity"]))
    indexes = info["indexes"]
    for m in sorted(indexes, key=lambda m: (m != "tracin", m != "retrac", m)):
        meta = indexes[m]
        add("search", f"{m}: {_describe_search(meta)}")
        if meta.get("fallback"):
            fb = meta["fallback"]
            add(
                "fallback",
                f"{m}: {fb.get('from')} reached recall@10 {fb.get('recall_at_10', 0):.3f} < "
                f"target {meta.get('target_recall')}; {_FALLBACK.get(fb.get('action'), '')}",
            )
        if meta.get("kind") == "ondisk":
            od = meta.get("ondisk") or {}
            add(
                "on disk",
                f"{m}: lists in {od.get('ivfdata')} ({od.get('bytes', 0) / 2**20:.1f} MiB), "
                "memory-mapped at query time",
            )
    for label, text in _served_lines(info):
        add(label, text)
    built, data = info.get("build_seconds"), info.get("data_seconds") or {}
    version = (info.get("versions") or {}).get("gradindex", "?")
    add("built", (f"in {built:g} s " if built is not None else "") + f"by gradindex {version}")
    if "waiting_s" in data:
        add("data", f"read in {data['reading_s']:g} s beside featurizing ({data['featurizing_s']:g}"
            f" s), which waited {data['waiting_s']:g} s for it")  # fmt: skip
    for key in sorted(set(info) - _INFO_KEYS):
        add(key, _render(info[key]))
    return lines


def _served_lines(info: dict[str, Any]) -> list[tuple[str, str]]:
    """The methods served from the rows: the kernel (trak, retrak) and the influence factors."""
    kern = info.get("kernel")
    if kern and "skipped" in kern:
        lines = [("kernel", f"none: {kern['skipped']}")]
    elif kern:
        lines = [("kernel", _kernel_line(kern))]
        if _kernel_search_line(kern):
            lines.append(("kernel search", _kernel_search_line(kern)))
    else:
        lines = [
            ("kernel", f"none; add it for --method trak with: gradindex kernel {info['path']}")
        ]
    return [*lines, ("factors", _factors_line(info))]


def _trained_lines(spec: dict[str, Any], run: dict[str, Any]) -> list[tuple[str, str]]:
    """The trained loss's weighting, and what the build took from the run's records."""
    parts = []
    if spec.get("snr_weighting", "none") == "snr":
        parts.append("snr(t)")
    elif spec.get("snr_weighting") == "min_snr":
        parts.append(f"min-SNR, gamma {spec['snr_gamma']:g}")
    parts += [
        f"{k.replace('_', ' ')} {spec[k]:g}" for k in _FLOATS if spec.get(k) and k != "snr_gamma"
    ]
    lines = [("loss weight", ", ".join(parts))] if parts else []
    if run.get("checkpoint_weights"):
        lines.append(("tracin w", f"auto, {run['checkpoint_weights']['method']}"))
    for name, origin in (run.get("taken") or {}).items():
        lines.append(("from run", f"{name}={spec.get(name)!r}: {origin}"))
    return lines


_WEIGHTS_LINE = {
    "raw": "raw (what the optimizer stepped) for every checkpoint of the run",
    "ema": "ema (the run's --use_ema averages: unet_ema/) for every checkpoint of the run",
}

_FALLBACK = {
    "fallback": "serves exact flat search instead",
    "warn": "kept as asked",
}


def _describe_search(meta: dict[str, Any]) -> str:
    """One index's kind, knobs and measured recall, e.g. 'hnsw (HNSW32,Flat), efSearch 64,
    recall@10 0.962 vs exact search (target 0.95)' (recall measured at build time)."""
    if meta.get("kind") == "flat":
        return "flat (exact)"
    knobs = ", ".join(f"{k} {v}" for k, v in (meta.get("knobs") or {}).items())
    recall = meta.get("recall_at_10")
    parts = [f"{meta.get('kind')} ({meta.get('factory')})"]
    if knobs:
        parts.append(knobs)
    if recall is not None:
        parts.append(f"recall@10 {recall:.3f} vs exact search (target {meta.get('target_recall')})")
    return ", ".join(parts)


def _short_list(values: list[Any], most: int = 12) -> str:
    """All values when few, else the first and last few with the count."""
    if len(values) <= most:
        return ", ".join(map(str, values))
    head, tail = ", ".join(map(str, values[:4])), ", ".join(map(str, values[-2:]))
    return f"{head}, ..., {tail} ({len(values)} values)"


def _render(value: Any) -> str:
    """Any JSON-like value on one line: dicts as 'key value' pairs (nested keys dotted), floats
    to 4 significant digits."""
    if isinstance(value, dict):
        return ", ".join(f"{k} {_render(v)}" for k, v in _flatten(value).items()) or "-"
    if isinstance(value, (list, tuple)):
        return "[" + _short_list([_render(v) for v in value], most=8) + "]"
    if isinstance(value, bool) or value is None:
        return {True: "yes", False: "no", None: "-"}[value]
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
