"""The commands that read an index: ``query`` (top-k training samples per test image or query
vector), ``info`` (the index summary) and ``report`` (its diagnostics). The library is imported
when a command runs, so ``gradindex --help`` loads no model code."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import click
import numpy as np

from gradindex.cli.options import conditioning_options, moved_checkpoints
from gradindex.cli.output import json_default, print_info
from gradindex.spec import METHODS


@click.command()
@click.argument("index_dir", type=click.Path())
@click.argument("images")
@moved_checkpoints
@click.option(
    "-k", "k", default=10, show_default=True, type=int, help="How many training samples per query."
)
@click.option(
    "--method",
    type=click.Choice([*METHODS, "trak", "retrak", "influence", "both", "all"]),
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
@conditioning_options
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
    from gradindex.search.results import result_lines, write_results
    from gradindex.store.kernel import KERNEL_METHODS

    check_k(k)  # before opening and embedding anything
    _check_inputs(output, from_vectors, labels, prompts, prompt_file, data_range)
    every = [m for m in SEARCH_METHODS if m != "influence"]  # influence needs its factors
    methods = {"both": list(METHODS), "all": every}.get(method, [method])
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
    if output:
        click.echo(write_results(results, names, resized, output))
    else:
        click.echo("\n".join(result_lines(results, names, as_json)))


def _check_inputs(
    output: str | None,
    from_vectors: bool,
    labels: tuple[str, ...],
    prompts: tuple[str, ...],
    prompt_file: str | None,
    data_range: tuple[float, float] | None,
) -> None:
    """``query``'s options that cannot go together, refused before anything is opened."""
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


@click.command()
@click.argument("index_dir", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the full manifest summary as JSON.")
@click.option("--verify", is_flag=True, help="Recompute file checksums against the manifest.")
@click.option(
    "--layers",
    is_flag=True,
    help="A Kronecker index: one line per parameter tensor (its factor shape and norm, or "
    "'dense': kept whole) instead of the two-line summary.",
)
def info(index_dir: str, as_json: bool, verify: bool, layers: bool) -> None:
    """Describe an index: rows, dimensions, spec, checkpoints, search settings."""
    from gradindex.query import AttributionIndex
    from gradindex.store.layout import RESTORE, check_files, read_manifest

    if verify:  # before opening, so a corrupted file is named rather than half-loaded
        path = Path(index_dir)
        problems = check_files(path, read_manifest(path), checksums=True, fix=RESTORE)
        if problems:
            raise click.ClickException("; ".join(problems))
    idx = AttributionIndex.open(index_dir)
    print_info(idx.info(), as_json, layers)
    if verify and not as_json:
        click.echo(f"verified     {len(idx.manifest['files'])} files match their checksums")


@click.command()
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
        click.echo(json.dumps(result, indent=2, sort_keys=True, default=json_default))
    else:
        click.echo("\n".join(format_report(result)))
