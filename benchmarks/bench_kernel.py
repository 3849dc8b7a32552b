"""Kernel methods at TracIn's cost (issue 27): ``trak`` / ``retrak`` against ``tracin`` /
``retrac`` side by side in one run, at each (N, checkpoints, d) of the grid.

Index: a real ``build_index`` over the digits UNet of ``bench_lds.py`` ((16, 32) channels,
K = 10 timesteps, sjlt) whose gradient rows are replaced by synthetic rows shaped like projected
gradients (``bench_search.synthetic``: clustered, power-law spectrum, heavy-tailed TracIn
norms), written through the store's own writer, so FAISS (flat: exact search for every method),
the kernel factors, their recall check and the manifest are the build's own. Per grid point:

- the kernel pass (``kernel.write_kernel``: both row sets' factors from the rows): seconds;
  kernel.h5 bytes against the rows' own bytes (4·N·D per row set), the rank kept per row set
  and whether it is exact;
- ``AttributionIndex.open`` plus the first search of each method in a fresh process state
  (the kernel methods read kernel.h5 there);
- single-vector search p50 / p99 per method through ``AttributionIndex.search``, the methods
  called in turn (interleaved) so that a shared machine's load falls on all alike; the query
  transform alone;
- one-image end-to-end query p50 (``AttributionIndex.query``: embedding + search);
- accuracy against the dense formula Σ_c w_c φ_c(q)ᵀ (G_c + λ_c I)⁻¹ φ_c(z) in float64 (the
  kernel before session 8): max relative score error and top-10 overlap on 50 queries (N ≤ d
  by the N × N dual solve; N > d by a d × d solve, skipped past ``--dense-max-d``), of the
  scores search serves: a dual kernel's own (``DualKernel.scores``), else the transformed
  query's inner products with the rows. The form of each row set's kernel (dual / primal).

Writes ``benchmarks/results/kernel.json`` and ``benchmarks/results/kernel.md``.

    python benchmarks/bench_kernel.py                  # the full grid (<= 10 min, 2 idle cores)
    python benchmarks/bench_kernel.py --grid 1000:1:512 --repeats 10 --query-repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_search import synthetic  # noqa: E402

import gradindex as gi  # noqa: E402
import gradindex.build.write as gbuild  # noqa: E402
from gradindex.demo.training import small_unet_config  # noqa: E402
from gradindex.query import stored_method  # noqa: E402
from gradindex.search.faiss_common import METHODS  # noqa: E402
from gradindex.store.kernel import KERNEL_METHODS  # noqa: E402
from gradindex.store.kernel_dual import DualKernel  # noqa: E402
from gradindex.store.layout import KERNEL  # noqa: E402

SEARCH_METHODS = (*METHODS, *KERNEL_METHODS)  # the methods served from the rows and kernel.h5

RESULTS = HERE / "results"
GRID = "100000:4:128,100000:1:512,1000:1:4096,1000:1:8192,2000:3:4096,10000:1:4096,10000:1:8192"
"""N:checkpoints:d. N = 1e5 only at D = 512: at d = 4096 its rows (1.6 GB a row set) and
their Gram would not fit the 10-minute run."""


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
            index="flat",
        )
    finally:
        gbuild._fill_rows = real


def interleaved(calls: dict, repeats: int) -> dict[str, dict[str, float]]:
    """{name: fn(i)}: ``repeats`` rounds calling every one in turn, rotating the order, so the
    load of a shared machine falls on all alike; p50 / p99 in ms (after one warm-up call)."""
    names = list(calls)
    for name in names:
        calls[name](0)
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(repeats):
        for j in range(len(names)):
            name = names[(i + j) % len(names)]
            t = time.perf_counter()
            calls[name](i + 1)
            times[name].append((time.perf_counter() - t) * 1e3)
    return {
        n: {"p50_ms": float(np.percentile(t, 50)), "p99_ms": float(np.percentile(t, 99))}
        for n, t in times.items()
    }


def timed_kernel(seconds: list[float]):
    """gbuild.write_kernel, timed into ``seconds``."""
    real = gbuild.write_kernel

    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        try:
            return real(*args, **kwargs)
        finally:
            seconds.append(time.perf_counter() - t)

    return real, wrapper


def dense_scores(
    x: np.ndarray, q: np.ndarray, weights: list[float], lams: list[float]
) -> np.ndarray:
    """Σ_c w_c φ_c(q)ᵀ (G_c + λ_c I)⁻¹ φ_c(z) in float64 for every row z (φ = block / √w):
    the N × N dual (K + λI)⁻¹ Φ φ(q) when N ≤ d, else a d × d solve."""
    n, dim = x.shape
    d = dim // len(weights)
    out = np.zeros((len(q), n))
    for c, w in enumerate(weights):
        xc = x[:, c * d : (c + 1) * d].astype(np.float64) / np.sqrt(w)
        qc = q[:, c * d : (c + 1) * d].astype(np.float64) / np.sqrt(w)
        if n <= d:
            out += w * np.linalg.solve(xc @ xc.T + lams[c] * np.eye(n), xc @ qc.T).T
        else:
            out += w * np.linalg.solve(xc.T @ xc + lams[c] * np.eye(d), qc.T).T @ xc.T
    return out


def accuracy(idx: gi.AttributionIndex, rows: dict, dense_max_d: int) -> dict:
    """Max relative score error and top-10 overlap of each kernel method against the dense
    formula on 50 queries; None where the dense solve is skipped."""
    man = idx.manifest
    num_ckpts = len(man["checkpoints"])
    d = idx.dim // num_ckpts
    out = {}
    for m in ("trak", "retrak"):
        if idx.manifest["num_rows"] > d > dense_max_d:
            out[m] = None
            continue
        x = idx.vectors(stored_method(m))
        q = rows[stored_method(m)][:50]
        lams = man["kernel"]["lambda" if m == "trak" else "lambda_retrac"]
        want = dense_scores(x, q, [c["weight"] for c in man["checkpoints"]], lams)
        kernel = idx.kernel_for(m)
        if isinstance(kernel, DualKernel):  # what search serves; the synthetic rows: none flagged
            got = kernel.scores(q).astype(np.float64)
        else:
            got = idx.kernel_vectors(q, m).astype(np.float64) @ x.T.astype(np.float64)
        top_w, top_g = (np.argsort(-s, axis=1)[:, :10] for s in (want, got))
        overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(top_w, top_g, strict=True)])
        rel = float(np.max(np.abs(got - want)) / np.max(np.abs(want)))
        out[m] = {"max_rel_error": rel, "top10_overlap": float(overlap)}
    return out


def _call(index: gi.AttributionIndex, what: str, data, method: str):
    """fn(i): the i-th query vector searched / transformed, or the image queried, by method."""
    if what == "query":
        return lambda i: index.query(data, 10, method)
    q = data[stored_method(method)]
    if what == "search":
        return lambda i: index.search(q[i], 10, method)
    kernel = index.kernel_for(method)
    if isinstance(kernel, DualKernel):  # the whole kernel search: scores, no transform
        return lambda i: kernel.scores(q[i : i + 1])
    return lambda i: index.kernel_vectors(q[i], method)


def point(work: Path, n: int, num_ckpts: int, d: int, args: argparse.Namespace) -> dict:
    """Every figure of one grid point."""
    ckpts = checkpoints(work / f"ckpts{num_ckpts}", num_ckpts)
    folder = work / f"idx-{n}-{num_ckpts}-{d}"
    dim = num_ckpts * d
    kernel_s: list[float] = []
    real, gbuild.write_kernel = timed_kernel(kernel_s)
    try:
        started = time.perf_counter()
        synthetic_index(folder, ckpts, n, dim)
        build_s = time.perf_counter() - started
    finally:
        gbuild.write_kernel = real
    queries = synthetic(max(args.repeats, 50) + 1, dim, "tracin", seed=9)
    rq = queries.reshape(len(queries), num_ckpts, -1)
    rq = (rq / np.linalg.norm(rq, axis=2, keepdims=True)).reshape(len(queries), dim)
    rows = {"tracin": queries, "retrac": rq}
    first = {}
    for m in SEARCH_METHODS:  # a fresh open each: what a one-off 'gradindex query' pays
        t = time.perf_counter()
        idx = gi.AttributionIndex.open(folder)
        idx.search(rows[stored_method(m)][0], 10, m)
        first[m] = (time.perf_counter() - t) * 1e3
    shared = gi.AttributionIndex.open(folder)  # one copy of the rows in memory for all methods
    idx = {m: shared for m in SEARCH_METHODS}
    image = np.random.default_rng(3).random((1, 1, 8, 8), dtype=np.float32)
    record = idx["trak"].manifest["kernel"]
    result = {
        "N": n,
        "checkpoints": num_ckpts,
        "d": d,
        "D": dim,
        "build_seconds": build_s,
        "kernel_seconds": kernel_s[0] if kernel_s else None,
        "kernel_bytes": (folder / KERNEL).stat().st_size,
        "row_bytes_per_set": 4 * n * dim,
        "rank": record.get("rank"),
        "exact": record.get("exact"),
        "form": record.get("form"),
        "open_first_search_ms": first,
        "search": interleaved(
            {m: _call(idx[m], "search", rows, m) for m in SEARCH_METHODS}, args.repeats
        ),
        "transform": interleaved(
            {m: _call(idx[m], "kernel_vectors", rows, m) for m in ("trak", "retrak")}, args.repeats
        ),
        "query": interleaved(
            {m: _call(idx[m], "query", image, m) for m in SEARCH_METHODS}, args.query_repeats
        ),
        "accuracy": accuracy(idx["trak"], rows, args.dense_max_d),
    }
    shutil.rmtree(folder)
    return result


def demo_point(folder: Path, repeats: int, query_repeats: int, dense_max_d: int) -> dict:
    """The issue's figures on a real demo index (``gradindex demo``'s index folder): kernel
    bytes, open + first search per method, serve start-up, search p50, accuracy on held-out
    queries (perturbed stored rows, as the build's recall check makes them)."""
    from gradindex.search.tuning import heldout_queries
    from gradindex.serve.app import create_app

    first = {}
    for m in SEARCH_METHODS:
        t = time.perf_counter()
        idx = gi.AttributionIndex.open(folder)
        x0 = idx.vectors(stored_method(m))[:1]
        idx.search(x0, 10, m)
        first[m] = (time.perf_counter() - t) * 1e3
    t = time.perf_counter()
    create_app(folder)
    serve_s = time.perf_counter() - t
    shared = gi.AttributionIndex.open(folder)  # one copy of the rows in memory for all methods
    idx = {m: shared for m in SEARCH_METHODS}
    rows = {r: heldout_queries(idx["trak"].vectors(r), max(repeats, 50) + 1, 5)
            for r in ("tracin", "retrac")}  # fmt: skip
    man = idx["trak"].manifest
    image = np.random.default_rng(3).random((1, *man["image_shape"]), dtype=np.float32)
    num_ckpts = len(man["checkpoints"])
    return {
        "N": man["num_rows"],
        "checkpoints": num_ckpts,
        "d": man["dim"] // num_ckpts,
        "D": man["dim"],
        "kernel_seconds": None,
        "kernel_bytes": (folder / KERNEL).stat().st_size,
        "row_bytes_per_set": 4 * man["num_rows"] * man["dim"],
        "rank": man["kernel"].get("rank"),
        "exact": man["kernel"].get("exact"),
        "form": man["kernel"].get("form"),
        "open_first_search_ms": first,
        "fresh_process_first_trak_s": fresh_process_first_search(folder),
        "serve_startup_s": serve_s,
        "search": interleaved(
            {m: _call(idx[m], "search", rows, m) for m in SEARCH_METHODS}, repeats
        ),
        "transform": interleaved(
            {m: _call(idx[m], "kernel_vectors", rows, m) for m in ("trak", "retrak")}, repeats
        ),
        "query": interleaved(
            {m: _call(idx[m], "query", image, m) for m in SEARCH_METHODS}, query_repeats
        ),
        "accuracy": accuracy(idx["trak"], rows, dense_max_d),
    }


FIRST_SEARCH = """import sys, time
t = time.perf_counter()
import gradindex as gi
idx = gi.AttributionIndex.open(sys.argv[1])
idx.search(idx.vectors("tracin")[:1], 10, sys.argv[2])
print(time.perf_counter() - t)
"""


def fresh_process_first_search(folder: Path) -> dict:
    """What a one-off ``gradindex query`` pays before its first answer, imports included, in
    a new process: ``trak`` with numba's on-disk cache empty (the first query after an install
    compiles the dual scan), then again with it filled, and ``tracin`` (no kernel) beside."""
    out = {}
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "NUMBA_CACHE_DIR": cache}
        for case, method in (("cold_numba_cache", "trak"), ("warm_numba_cache", "trak"),
                             ("tracin", "tracin")):  # fmt: skip
            run = subprocess.run([sys.executable, "-c", FIRST_SEARCH, str(folder), method],
                                 env=env, capture_output=True, text=True, check=True)  # fmt: skip
            out[case] = float(run.stdout.split()[-1])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--grid", default=GRID, help="N:checkpoints:d,... (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--query-repeats", type=int, default=7)
    p.add_argument("--dense-max-d", type=int, default=4096, help="largest d of a d x d solve")
    p.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--out", default=str(RESULTS), help="folder for kernel.json / kernel.md")
    p.add_argument("--demo", default=None, help="a 'gradindex demo' index folder to measure too")
    args = p.parse_args()
    torch.set_num_threads(1)
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_kernel_"))
    results: dict = {"points": []}
    started = time.perf_counter()
    try:
        if args.demo:
            results["demo"] = demo_point(
                Path(args.demo), args.repeats, args.query_repeats, args.dense_max_d
            )
            print(json.dumps(results["demo"]), flush=True)
        for item in filter(None, args.grid.split(",")):
            n, num_ckpts, d = (int(v) for v in item.split(":"))
            results["points"].append(point(work, n, num_ckpts, d, args))
            print(json.dumps(results["points"][-1]), flush=True)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    results["seconds"] = time.perf_counter() - started
    results["machine"] = machine_record()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kernel.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "kernel.md").write_text(markdown(results))
    print(markdown(results))


def _acc(a: dict | None) -> str:
    if a is None:
        return "not computed (d x d solve past --dense-max-d)"
    return f"top-10 overlap {a['top10_overlap']:.3f}, max rel. error {a['max_rel_error']:.1e}"


def machine_record() -> dict:
    """The machine a run's figures come from: platform, CPUs, torch threads and the
    ``BENCH_MACHINE`` note (what else ran beside it)."""
    return {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "note": os.environ.get("BENCH_MACHINE", "machine not described (set BENCH_MACHINE)"),
    }


def markdown(r: dict) -> str:
    points = ([{**r["demo"], "label": "demo index"}] if r.get("demo") else []) + [
        {**pt, "label": "synthetic"} for pt in r["points"]
    ]
    lines = [
        "# Kernel methods at TracIn's cost",
        "",
        "Synthetic rows (shaped like projected gradients: clustered, power-law spectrum, "
        "heavy-tailed TracIn norms) written through the store's writer into a real build over "
        "the digits UNet (K = 10 timesteps); the demo index (when given) is `gradindex demo`'s "
        "own. Every figure through `AttributionIndex`; flat (exact) search for every method, "
        "k = 10, 1 thread; ratios against `tracin` in the same run. Form: `dual` (N < d: "
        "V [N, r] per checkpoint, every row scored by (K + λ)⁻¹ X q, X q summed in float64, "
        "the eigenpairs above 4λ applied in float64; the 60 MiB budget shared by both row "
        "sets by one threshold on S / λ) or `primal` (U [d, r], a transformed query through "
        "the TracIn / ReTrac index). A dual kernel forms its N × N products when a λ is asked "
        "the second time: one call inside its p99. Accuracy: the scores search serves, over "
        "every row, against the dense formula in float64 (the kernel before session 8), 50 "
        "queries; an exact kernel (rank kept = N) must be within 1e-5, a truncated one is an "
        "approximation (top-10 overlap >= 0.99; its LDS cost in "
        "[kernel_lds.md](kernel_lds.md)).",
        "",
        "| rows | N | C × d | kernel.h5 MiB | rows MiB (one set) | form | rank kept "
        "(trak / retrak) | kernel pass s | open + first search ms (tracin / trak / retrak) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for pt in points:
        rank, exact, first = pt["rank"] or {}, pt["exact"] or {}, pt["open_first_search_ms"]
        ranks = " / ".join(
            f"{rank.get(s, '?')}{' exact' if exact.get(s) else ''}" for s in ("tracin", "retrac")
        )
        secs = "–" if pt["kernel_seconds"] is None else f"{pt['kernel_seconds']:.1f}"
        form = " / ".join(sorted(set((pt.get("form") or {"": "primal"}).values())))
        lines.append(
            f"| {pt['label']} | {pt['N']:,} | {pt['checkpoints']} × {pt['d']} "
            f"| {pt['kernel_bytes'] / 2**20:.1f} | {pt['row_bytes_per_set'] / 2**20:.1f} "
            f"| {form} | {ranks} | {secs} "
            f"| {first['tracin']:.0f} / {first['trak']:.0f} / {first['retrak']:.0f} |"
        )
    if r.get("demo"):
        demo = r["demo"]
        lines += ["", f"`serve` start-up on the demo index: {demo['serve_startup_s']:.2f} s."]
        if "fresh_process_first_trak_s" in demo:
            fresh = demo["fresh_process_first_trak_s"]
            lines += [
                "",
                "A new process's imports, open and first `trak` search on the demo index "
                f"(a one-off `gradindex query`): {fresh['cold_numba_cache']:.2f} s with numba's "
                "cache empty (the first query after an install compiles the dual scan), "
                f"{fresh['warm_numba_cache']:.2f} s after; `tracin` "
                f"{fresh['tracin']:.2f} s.",
            ]
    lines += [
        "",
        "| rows | N | C × d | method | search p50 ms | × tracin | p99 ms "
        "| one-image query p50 ms | × tracin | vs the dense formula |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for pt in points:
        base_s = pt["search"]["tracin"]["p50_ms"]
        query = pt.get("query")
        for m, s in pt["search"].items():
            acc = _acc(pt["accuracy"].get(m)) if m in pt["accuracy"] else ""
            q = "– | –"
            if query:
                q = f"{query[m]['p50_ms']:.1f} | {query[m]['p50_ms'] / query['tracin']['p50_ms']:.2f}"
            lines.append(
                f"| {pt['label']} | {pt['N']:,} | {pt['checkpoints']} × {pt['d']} | {m} "
                f"| {s['p50_ms']:.2f} | {s['p50_ms'] / base_s:.2f} | {s['p99_ms']:.2f} | {q} "
                f"| {acc} |"
            )
    lines += [
        "",
        f"Whole run {r['seconds']:.0f} s. Machine: {r['machine']['platform']}, "
        f"{r['machine']['cpu_count']} CPUs; {r['machine']['note']}.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
