"""The commands around an index: ``export`` (into Milvus), ``serve`` (the browser app) and
``demo`` (train, index and attribute a small model end to end). Each imports its stage when it
runs, so ``gradindex --help`` needs neither pymilvus nor the web extra."""

from __future__ import annotations

import json
from pathlib import Path

import click

from gradindex.cli.options import moved_checkpoints


@click.command()
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


@click.command()
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
@moved_checkpoints
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


@click.command()
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
