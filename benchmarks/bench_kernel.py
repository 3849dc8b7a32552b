"""Kernel methods' cost: search and query latency of ``trak`` / ``retrak`` against ``tracin`` /
``retrac`` in the same run, and the kernel pass's time and memory against N and d.

Index: a real ``build_index`` over the digits UNet of ``bench_lds.py`` ((16, 32) channels,
4 checkpoints, K = 10 timesteps, sjlt) whose gradient rows are replaced by synthetic rows shaped
like projected gradients (``bench_search.synthetic``), written through the store's own writer
(``VectorStore.write_rows``), so FAISS, the kernel pass and the manifest are the build's own.

- single-vector search at N = 1e5, D = 512 (C = 4 checkpoints × d = 128, and C = 1 × d = 512):
  the first call (reads kernel.h5 and inverts G_c + λI) and the p50 / p99 of the next ones, per
  method, through ``AttributionIndex.search``, the methods called in turn (interleaved) so that
  a shared machine's load falls on all alike; the kernel methods' query transform alone;
- one-image end-to-end query (``AttributionIndex.query``: embedding + search) p50 per method;
- the kernel pass (``kernel.write_kernel``: both Grams, one streamed pass each) time and peak
  traced memory against N and d; kernel.h5 size.

Writes ``benchmarks/results/kernel.json`` and ``benchmarks/results/kernel.md``.

    python benchmarks/bench_kernel.py            # N = 1e5 latency + kernel pass grid
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_search import synthetic  # noqa: E402

import gradindex as gi  # noqa: E402
import gradindex.build_write as gbuild  # noqa: E402
from gradindex.demo.training import small_unet_config  # noqa: E402
from gradindex.index.kernel import write_kernel  # noqa: E402
from gradindex.index.layout import KERNEL  # noqa: E402
from gradindex.query import SEARCH_METHODS, stored_method  # noqa: E402

RESULTS = HERE / "results"


def checkpoints(root: Path, num: int) -> list[Path]:
    """``num`` randomly initialised digits UNets (the LDS model's shape), saved as pipelines."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    out = []
    for c in range(num):
        torch.manual_seed(c)
        unet = UNet2DModel(**small_unet_config(sample_size=8, block_out_channels=(16, 32)))
        DDPMPipeline(unet=unet, scheduler=DDPMScheduler(1000)).save_pretrained(root / f"c{c}")
        out.append(root / f"c{c}")
    return out


def synthetic_index(out: Path, ckpts: list[Path], n: int, dim: int) -> gi.AttributionIndex:
    """A real build whose rows are synthetic: ``_fill_rows`` writes them through the store's
    writer instead of embedding the (blank) images."""
    num_ckpts = len(ckpts)
    d = dim // num_ckpts
    tracin = synthetic(n, dim, "tracin", seed=1)
    retrac = synthetic(n, dim, "retrac", seed=2).reshape(n, num_ckpts, d)
    retrac /= np.linalg.norm(retrac, axis=2, keepdims=True)  # unit blocks, √w = 1
    retrac = retrac.reshape(n, dim)

    def fill(store, *args, **kwargs):
        norms_shape = (num_ckpts, store.file["norms"].shape[-1])
        for a in range(0, n, 16384):
            b = min(n, a + 16384)
            store.write_rows(
                a, tracin[a:b], retrac[a:b], np.ones((b - a, *norms_shape)), np.zeros(b - a, bool)
            )

    spec = gi.BuildSpec(
        proj_dim=d,
        projection="sjlt",
        timesteps=10,
        noise_draws=1,
        batch_size=64,
        checkpoint_weights=(1.0,) * num_ckpts,
    )
    real = gbuild._fill_rows
    gbuild._fill_rows = fill
    try:
        return gi.build_index(
            checkpoints=[str(c) for c in ckpts],
            data=np.zeros((n, 1, 8, 8), np.float32),
            out=out,
            spec=spec,
            progress=False,
            fidelity_sample=0,
            overwrite=True,
        )
    finally:
        gbuild._fill_rows = real


def interleaved(calls: dict, repeats: int) -> dict[str, dict[str, float]]:
    """{name: fn(i)}: the first call of each (cold: a kernel method reads kernel.h5 and
    inverts G_c + λI), then ``repeats`` rounds calling every one in turn, rotating the order, so
    the load of a shared machine falls on all alike; p50 / p99 in ms."""
    names = list(calls)
    out = {}
    for name in names:
        t = time.perf_counter()
        calls[name](0)
        out[name] = {"first_ms": (time.perf_counter() - t) * 1e3, "times": []}
    for i in range(repeats):
        for j in range(len(names)):
            name = names[(i + j) % len(names)]
            t = time.perf_counter()
            calls[name](i + 1)
            out[name]["times"].append((time.perf_counter() - t) * 1e3)
    for rec in out.values():
        times = rec.pop("times")
        rec["p50_ms"] = float(np.percentile(times, 50))
        rec["p99_ms"] = float(np.percentile(times, 99))
    return out


def latency(folder: Path, ckpts: list[Path], n: int, dim: int, repeats: int) -> dict:
    started = time.perf_counter()
    synthetic_index(folder, ckpts, n, dim)
    build_s = time.perf_counter() - started
    queries = synthetic(repeats + 1, dim, "tracin", seed=9)
    rq = queries.reshape(len(queries), len(ckpts), -1)
    rq = (rq / np.linalg.norm(rq, axis=2, keepdims=True)).reshape(len(queries), dim)
    rows = {"tracin": queries, "retrac": rq}
    image = np.random.default_rng(3).random((1, 1, 8, 8), dtype=np.float32)
    idx = {
        m: gi.AttributionIndex.open(folder) for m in SEARCH_METHODS
    }  # each pays its own cold call

    def search(m):
        return lambda i: idx[m].search(rows[stored_method(m)][i], 10, m)

    def transform(m):
        return lambda i: idx[m].kernel_vectors(rows[stored_method(m)][i], m)

    def query(m):
        return lambda i: idx[m].query(image, 10, m)

    kernel_methods = [m for m in SEARCH_METHODS if m != stored_method(m)]
    return {
        "N": n,
        "D": dim,
        "checkpoints": len(ckpts),
        "d": dim // len(ckpts),
        "build_seconds": build_s,
        "search": interleaved({m: search(m) for m in SEARCH_METHODS}, repeats),
        "transform": interleaved({m: transform(m) for m in kernel_methods}, repeats),
        "query": interleaved({m: query(m) for m in SEARCH_METHODS}, max(5, repeats // 10)),
        "kernel_bytes": (folder / KERNEL).stat().st_size,
    }


def kernel_pass(folder: Path, num_ckpts: int) -> dict:
    """Time and peak traced memory of recomputing both Grams of a built index."""
    weights = [1.0] * num_ckpts
    build_id = json.loads((folder / "manifest.json").read_text())["build_id"]
    tracemalloc.start()
    t = time.perf_counter()
    write_kernel(folder, weights, build_id)
    seconds = time.perf_counter() - t
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {"seconds": seconds, "peak_mib": peak / 2**20}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--repeats", type=int, default=100)
    p.add_argument("--grid", default="10000:512:4,100000:512:4,10000:512:1,100000:512:1,"
                   "10000:2048:1,10000:4096:1")  # fmt: skip
    p.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    args = p.parse_args()
    torch.set_num_threads(1)
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_kernel_"))
    results: dict = {"latency": [], "kernel_pass": []}
    try:
        for num_ckpts in (4, 1):
            ckpts = checkpoints(work / f"ckpts{num_ckpts}", num_ckpts)
            results["latency"].append(
                latency(work / f"lat{num_ckpts}", ckpts, args.n, 512, args.repeats)
            )
            print(json.dumps(results["latency"][-1]), flush=True)
            shutil.rmtree(work / f"lat{num_ckpts}")
        for item in args.grid.split(","):
            n, dim, num_ckpts = (int(v) for v in item.split(":"))
            ckpts = checkpoints(work / f"ckpts{num_ckpts}", num_ckpts)
            folder = work / f"grid-{n}-{dim}-{num_ckpts}"
            synthetic_index(folder, ckpts, n, dim)
            rec = {"N": n, "D": dim, "checkpoints": num_ckpts, "d": dim // num_ckpts}
            rec.update(kernel_pass(folder, num_ckpts))
            rec["kernel_bytes"] = (folder / KERNEL).stat().st_size
            results["kernel_pass"].append(rec)
            print(rec, flush=True)
            shutil.rmtree(folder)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    results["machine"] = {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "note": "2 CPU cores shared with other developers; niced, 1 thread",
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "kernel.json").write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / "kernel.md").write_text(markdown(results))
    print(markdown(results))


def markdown(r: dict) -> str:
    lines = [
        "# Kernel methods: latency and kernel pass",
        "",
        "Synthetic rows (shaped like projected gradients) written through the store's writer "
        "into a real build over the digits UNet (K = 10 timesteps); every figure through "
        "`AttributionIndex`. Flat (exact) search, k = 10, 1 thread.",
        "",
    ]
    for lat in r["latency"]:
        lines += [
            f"## N = {lat['N']:,}, D = {lat['D']} ({lat['checkpoints']} checkpoint(s) × "
            f"d = {lat['d']}); kernel.h5 {lat['kernel_bytes'] / 2**20:.1f} MiB",
            "",
            "| method | search first call ms | search p50 ms | p99 ms | × tracin (p50) "
            "| one-image query p50 ms | × tracin |",
            "|---|---|---|---|---|---|---|",
        ]
        base_s, base_q = lat["search"]["tracin"]["p50_ms"], lat["query"]["tracin"]["p50_ms"]
        for m, s in lat["search"].items():
            q = lat["query"][m]
            lines.append(
                f"| {m} | {s['first_ms']:.1f} | {s['p50_ms']:.2f} | {s['p99_ms']:.2f} | "
                f"{s['p50_ms'] / base_s:.2f} | {q['p50_ms']:.1f} | {q['p50_ms'] / base_q:.2f} |"
            )
        lines += [
            "",
            "The query transform alone (`kernel_vectors`, one vector): "
            + ", ".join(
                f"{m} p50 {t['p50_ms']:.3f} ms (first call {t['first_ms']:.1f} ms)"
                for m, t in lat["transform"].items()
            )
            + ".",
            "",
        ]
    lines += [
        "## Kernel pass (both Grams: TracIn and ReTrac rows, one streamed pass each)",
        "",
        "| N | D | checkpoints × d | seconds | peak traced MiB | kernel.h5 MiB |",
        "|---|---|---|---|---|---|",
    ]
    for k in r["kernel_pass"]:
        lines.append(
            f"| {k['N']:,} | {k['D']} | {k['checkpoints']} × {k['d']} | {k['seconds']:.2f} | "
            f"{k['peak_mib']:.1f} | {k['kernel_bytes'] / 2**20:.1f} |"
        )
    lines += ["", f"Machine: {r['machine']['platform']}, {r['machine']['note']}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
