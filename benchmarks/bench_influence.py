"""What the 'influence' method costs (issue 26): its factor pass against the featurizing pass,
and a query against a TracIn query, side by side in one process on one index.

Index: a copy of a ``gradindex demo`` index (digits UNet, its checkpoints and training images;
``--demo DIR``, the demo's ``--out`` folder). In this process, one thread:

- the featurizing pass: ``AttributionIndex.embed`` of every training image (the rows a build
  computes, with the index's spec: every timestep, draw and checkpoint), seconds;
- the factor pass: ``query_influence.add_factors`` from the same images (every one, as
  ``gradindex factors`` does by default), seconds, written into the copy;
- query p50 / p99 of ``AttributionIndex.query(image, k=10, method=...)`` for 'tracin',
  'retrac' and 'influence' on one image at a time (20 of the training digits: only the cost is
  measured here), the methods called in turn (interleaved) so a shared machine's load falls
  on all alike.

The issue's bars: factor pass ≤ 1× the featurizing pass, an influence query ≤ 2× a TracIn one.
Writes ``benchmarks/results/influence.json`` and ``influence.md`` (``--stem`` renames them).
Any index folder with its training images beside it as ``train.npy`` will do as ``--demo``.

    python benchmarks/bench_influence.py --demo DEMO_OUT
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_kernel import machine_record  # noqa: E402

import gradindex as gi  # noqa: E402
from gradindex.query_influence import add_factors  # noqa: E402
from gradindex.store.layout import MANIFEST, write_json_atomic  # noqa: E402

RESULTS = HERE / "results"
METHODS = ("tracin", "retrac", "influence")


def timed(fn) -> tuple[float, object]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def query_times(idx: gi.AttributionIndex, images: np.ndarray, repeats: int) -> dict:
    """p50 / p99 ms of a one-image query per method, interleaved, after one warm-up each."""
    for m in METHODS:
        idx.query(images[:1], k=10, method=m)
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    for i in range(repeats):
        image = images[i % len(images)][None]
        for j in range(len(METHODS)):
            m = METHODS[(i + j) % len(METHODS)]
            t, _ = timed(lambda m=m, image=image: idx.query(image, k=10, method=m))
            times[m].append(t * 1e3)
    return {
        m: {"p50_ms": float(np.percentile(t, 50)), "p99_ms": float(np.percentile(t, 99))}
        for m, t in times.items()
    }


def run(demo: Path, repeats: int, work: Path) -> dict:
    folder = work / "index"
    shutil.copytree(demo / "index", folder, ignore=shutil.ignore_patterns("factors.h5"))
    man = json.loads((folder / MANIFEST).read_text())
    if man.pop("factors", None) is not None:  # factors computed before: timed anew here
        man["files"].pop("factors.h5", None)
        write_json_atomic(folder / MANIFEST, man)
    train = np.load(demo / "train.npy")
    idx = gi.AttributionIndex.open(folder)
    featurize_s, _ = timed(lambda: idx.embed(train))
    factor_s, record = timed(lambda: add_factors(idx, train))
    idx = gi.AttributionIndex.open(folder)  # the factors as a query reads them
    images = train[-20:]
    query = query_times(idx, images, repeats)
    return {
        "index": {
            "rows": idx.manifest["num_rows"],
            "checkpoints": len(idx.manifest["checkpoints"]),
            "timesteps": idx.manifest["timesteps"],
            "noise_draws": idx.spec.noise_draws,
            "num_params": idx.manifest["num_params"],
        },
        "featurize_s": featurize_s,
        "factor_pass_s": factor_s,
        "factor_over_featurize": factor_s / featurize_s,
        "factor_samples": record.get("samples"),
        "query": query,
        "influence_over_tracin": query["influence"]["p50_ms"] / query["tracin"]["p50_ms"],
    }


def markdown(r: dict, command: str) -> str:
    ix, q = r["index"], r["query"]
    lines = [
        "# What the influence method costs",
        "",
        f"A copy of the index in `{r['source']}`: {ix['rows']:,} training images, "
        f"{ix['checkpoints']} checkpoints, {len(ix['timesteps'])} timesteps × "
        f"{ix['noise_draws']} draw(s), {ix['num_params']:,} parameters; one process, "
        f"{r['machine']['torch_threads']} thread. Bars (issue 26): factor pass ≤ 1× the "
        "featurizing pass, an influence query ≤ 2× a TracIn one.",
        "",
        "| pass | seconds | × featurizing |",
        "|---|---|---|",
        f"| featurizing (`embed` of every training image) | {r['featurize_s']:.1f} | 1.00 |",
        f"| factor pass (`add_factors`, {r['factor_samples']} samples) "
        f"| {r['factor_pass_s']:.1f} | {r['factor_over_featurize']:.2f} |",
        "",
        "| one-image query (k = 10) | p50 ms | × tracin | p99 ms |",
        "|---|---|---|---|",
    ]
    base = q["tracin"]["p50_ms"]
    for m in METHODS:
        lines.append(
            f"| {m} | {q[m]['p50_ms']:.1f} | {q[m]['p50_ms'] / base:.2f} | {q[m]['p99_ms']:.1f} |"
        )
    lines += [
        "",
        f"Command: `{command}`. Whole run {r['seconds']:.0f} s. Machine: "
        f"{r['machine']['platform']}, {r['machine']['cpu_count']} CPUs; {r['machine']['note']}.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--demo", required=True, help="a 'gradindex demo --out' folder")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--stem", default="influence", help="results file names (default: %(default)s)")
    args = p.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        r = run(Path(args.demo), args.repeats, Path(tmp))
    r["seconds"] = time.perf_counter() - started
    r["source"] = args.demo
    r["machine"] = machine_record()
    out = Path(args.out)
    (out / f"{args.stem}.json").write_text(json.dumps(r, indent=2) + "\n")
    text = markdown(
        r, f"python benchmarks/bench_influence.py --demo {args.demo} --stem {args.stem}"
    )
    (out / f"{args.stem}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
