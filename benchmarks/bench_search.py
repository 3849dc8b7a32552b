"""Search benchmark: every index kind against brute-force numpy search, in the same run.

For N in {1e4, 1e5} (1e6 with --large), D in {512, 2048}, both methods and each kind (flat, ivf,
hnsw; ``auto`` is whichever of them ``search_tuning.choose_kind`` names, built the same way):
build time (tuning included), bytes per vector (serialized FAISS index), single-query p50/p99
(through ``VectorIndex.search``, validation included), batch queries/s, and recall@10 against
exact search on held-out rows. Baseline: brute-force ``queries @ X.T`` + argpartition in numpy,
which is what existing attribution code does. Every figure also appears as a ratio to it.

Data: a synthetic generator shaped like projected gradient features (clustered directions,
decaying spectrum; TracIn norms lognormal with sigma 1.5, ReTrac rows unit norm). If
``benchmarks/cache/demo_rows.npz`` (arrays ``tracin``, ``retrac``) exists, its real rows are
benchmarked too, together with a generator fitted to them (cluster centres, residual spectrum,
norm distribution) at the sizes above. Queries are always rows the index has not seen.

Writes ``benchmarks/results/search.json`` and ``benchmarks/results/search.md``.

    python benchmarks/bench_search.py                 # N = 1e4, 1e5
    python benchmarks/bench_search.py --large         # adds N = 1e6 (run once, record it)
    python benchmarks/bench_search.py --sizes --large --dims 512 --name search_1e6  # 1e6 only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
import warnings
from pathlib import Path

import faiss
import numpy as np
from threadpoolctl import threadpool_limits

from gradindex.search import tuning as search_tuning
from gradindex.search.faiss_index import VectorIndex, set_num_threads

HERE = Path(__file__).resolve().parent
K = 10
TARGET = 0.95


def synthetic(n: int, d: int, method: str, seed: int, clusters: int = 256) -> np.ndarray:
    """Rows like projected gradients: clustered directions, power-law spectrum. # [n, d]"""
    rng = np.random.default_rng(seed)
    spectrum = np.arange(1, d + 1, dtype=np.float32) ** -0.7
    spectrum /= np.linalg.norm(spectrum)
    centers = rng.standard_normal((clusters, d), dtype=np.float32) * spectrum
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    x = np.empty((n, d), dtype=np.float32)
    for i0 in range(0, n, 65536):  # chunks keep the temporaries small
        m = min(65536, n - i0)
        block = rng.standard_normal((m, d), dtype=np.float32) * (spectrum * 0.6)
        block += centers[rng.integers(0, clusters, m)]
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        x[i0 : i0 + m] = block
    if method == "tracin":
        x *= rng.lognormal(0.0, 1.5, n).astype(np.float32)[:, None]
    return x


def fit_generator(rows: np.ndarray, seed: int = 0) -> dict:
    """Fit cluster centres, residual spectrum and norm distribution of real rows."""
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    norms = np.linalg.norm(rows, axis=1)
    dirs = rows / np.maximum(norms, 1e-30)[:, None]
    k = int(np.clip(len(rows) // 20, 1, 64))
    km = faiss.Kmeans(rows.shape[1], k, niter=20, seed=seed, spherical=True, verbose=False)
    km.train(dirs)
    _, assign = km.index.search(dirs, 1)
    resid = dirs - km.centroids[assign[:, 0]]
    _, s, vt = np.linalg.svd(resid, full_matrices=False)
    return {
        "centers": km.centroids,
        "weights": np.bincount(assign[:, 0], minlength=k) / len(rows),
        "scales": s / np.sqrt(len(rows)),
        "basis": vt,
        "log_norms": np.log(np.maximum(norms, 1e-30)),
    }


def fitted(fit: dict, n: int, seed: int) -> np.ndarray:
    """n rows from a fitted generator: centre + residual in the fitted basis, resampled norms."""
    rng = np.random.default_rng(seed)
    r, d = fit["basis"].shape
    x = np.empty((n, d), dtype=np.float32)
    for i0 in range(0, n, 65536):
        m = min(65536, n - i0)
        z = rng.standard_normal((m, r), dtype=np.float32) * fit["scales"].astype(np.float32)
        block = fit["centers"][rng.choice(len(fit["centers"]), m, p=fit["weights"])]
        block = block + z @ fit["basis"].astype(np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        log_n = rng.choice(fit["log_norms"], m) + rng.normal(0, 0.05, m)
        x[i0 : i0 + m] = block * np.exp(log_n).astype(np.float32)[:, None]
    return x


def brute_force(q: np.ndarray, x: np.ndarray, k: int) -> np.ndarray:
    """The baseline: numpy matmul + argpartition + sort, 256 queries at a time. # [B, k] rows"""
    out = np.empty((len(q), k), dtype=np.int64)
    for i0 in range(0, len(q), 256):
        s = q[i0 : i0 + 256] @ x.T  # [b, N]
        part = np.argpartition(-s, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(s, part, 1), axis=1)
        out[i0 : i0 + 256] = np.take_along_axis(part, order, 1)
    return out


def timings(search, q: np.ndarray, budget_s: float) -> dict:
    """Single-query p50/p99 (at least 20 queries, up to len(q) or the time budget) and batch q/s."""
    lat = []
    t_end = time.perf_counter() + budget_s
    for i in range(len(q)):
        t = time.perf_counter()
        search(q[i : i + 1])
        lat.append(time.perf_counter() - t)
        if i >= 19 and time.perf_counter() > t_end:
            break
    per = float(np.median(lat))
    nb = len(q) if per < 0.02 else max(32, min(len(q), int(budget_s / per)))
    t = time.perf_counter()
    search(q[:nb])
    batch = time.perf_counter() - t
    ms = np.array(lat) * 1e3
    return {
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "single_queries": len(lat),
        "batch_qps": nb / batch,
        "batch_queries": nb,
    }


def saved_bytes(vi: VectorIndex) -> int:
    """Size of the FAISS file ``save`` writes (the sidecar JSON not counted)."""
    with tempfile.TemporaryDirectory() as tmp:
        vi.save(Path(tmp) / "index.faiss")
        return os.path.getsize(Path(tmp) / "index.faiss")


def recall10(rows: np.ndarray, q: np.ndarray, x: np.ndarray, exact_scores: np.ndarray) -> float:
    return search_tuning.recall_at_k(rows, q, x, exact_scores)


def bench_one(x: np.ndarray, q: np.ndarray, method: str, kinds: list[str], budget: float) -> list:
    """All kinds plus the baseline on one matrix; queries q are unseen rows."""
    n, d = x.shape
    exact_scores, _ = faiss.knn(q, x, K, metric=faiss.METRIC_INNER_PRODUCT)
    base = timings(lambda qq: brute_force(qq, x, K), q, budget)
    base.update(
        kind="brute-force numpy", factory="-", knobs={}, build_s=0.0, bytes_per_vector=4 * d
    )
    base.update(recall_at_10=recall10(brute_force(q, x, K), q, x, exact_scores), meets_target=True)
    out = [base]
    auto = search_tuning.choose_kind(n, d)
    for kind in kinds:
        t = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:  # report misses, don't fall back
            warnings.simplefilter("always")
            vi = VectorIndex.build(x, method, kind=kind, target_recall=TARGET, on_miss="warn")
        build_s = time.perf_counter() - t
        info = vi.info
        row = timings(lambda qq, vi=vi: vi.search(qq, K), q, budget)
        row.update(
            kind=kind + (" (auto)" if kind == auto else ""),
            factory=info["factory"],
            knobs=info["knobs"],
            build_s=build_s,
            bytes_per_vector=saved_bytes(vi) / n,
            recall_at_10=recall10(vi.search(q, K).rows, q, x, exact_scores),
            build_recall_at_10=info["recall_at_10"],
            meets_target=info["meets_target"],
            warnings=[str(w.message) for w in caught],
        )
        for key in ("p50_ms", "p99_ms"):
            row[key.replace("_ms", "_speedup")] = base[key] / row[key]
        row["batch_speedup"] = row["batch_qps"] / base["batch_qps"]
        out.append(row)
        summary = f"p50 {row['p50_ms']:8.3f} ms  recall {row['recall_at_10']:.3f}"
        print(f"  {method} {row['kind']}: {summary}  build {build_s:.1f} s", flush=True)
        del vi
    return out


def machine() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(
                (ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu
            )
    except OSError:
        pass
    return {
        "cpu": cpu,
        "usable_cores": len(os.sched_getaffinity(0)),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "faiss": faiss.__version__,
        "load_average_at_start": os.getloadavg(),
    }


def to_markdown(res: dict) -> str:
    m = res["machine"]
    lines = [
        "# Search benchmark",
        "",
        f"Machine: {m['cpu']}, {m['usable_cores']} usable cores, {m['platform']}; "
        f"faiss {m['faiss']}, numpy {m['numpy']}; threads for batches (FAISS and the numpy "
        f"baseline's BLAS) {res['threads']}, single queries 1. "
        f"Load average {m['load_average_at_start'][0]:.1f} at start, "
        f"{res['load_average_at_end'][0]:.1f} at end (other jobs share these cores: "
        "absolute times are noisy, ratios to the same-run baseline less so).",
        "",
        f"Queries: {res['n_queries']} rows unseen by the index. recall@10 against exact search; "
        f"target {TARGET}. Speedups are brute-force time / index time (batch: q/s ratio). "
        "Indexes that miss the target are kept (on_miss='warn') and flagged; the library default "
        "would fall back to flat.",
        "",
        "| data | N | D | method | kind | knobs | build s | bytes/vec | p50 ms | p99 ms "
        "| batch q/s | recall@10 | p50 speedup | batch speedup |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for cfg in res["configs"]:
        for r in cfg["rows"]:
            flag = "" if r["meets_target"] else " (misses target)"
            knobs = ", ".join(f"{k}={v}" for k, v in r["knobs"].items()) or "-"
            sp = f"{r['p50_speedup']:.1f}x" if "p50_speedup" in r else "1x"
            bs = f"{r['batch_speedup']:.2f}x" if "batch_speedup" in r else "1x"
            lines.append(
                f"| {cfg['data']} | {cfg['n']:,} | {cfg['d']} | {cfg['method']} | {r['kind']} "
                f"| {knobs} | {r['build_s']:.1f} | {r['bytes_per_vector']:.0f} | {r['p50_ms']:.3f} "
                f"| {r['p99_ms']:.3f} | {r['batch_qps']:.0f} | {r['recall_at_10']:.3f}{flag} "
                f"| {sp} | {bs} |"
            )
    lines += ["", "## Must show", ""] + [f"- {c}" for c in res["checks"]]
    return "\n".join(lines) + "\n"


def checks(res: dict) -> list[str]:
    out = []
    for n, limit in ((100_000, 2.0), (1_000_000, 10.0)):
        for cfg in res["configs"]:
            if cfg["n"] != n or cfg["d"] != 512 or cfg["data"] != "synthetic":
                continue
            rows = [r for r in cfg["rows"] if "(auto)" in r["kind"]]
            for r in rows:
                ok = r["p50_ms"] <= limit and r["recall_at_10"] >= TARGET
                out.append(
                    f"{'PASS' if ok else 'FAIL'}: N={n:,}, D=512, {cfg['method']}, {r['kind']}: "
                    f"p50 {r['p50_ms']:.3f} ms (limit {limit} ms, {r['p50_speedup']:.0f}x faster "
                    f"than brute force), recall@10 {r['recall_at_10']:.3f} (target {TARGET})"
                )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--large", action="store_true", help="also N = 1e6 (minutes per config)")
    ap.add_argument("--sizes", type=float, nargs="*", default=[1e4, 1e5])
    ap.add_argument("--dims", type=int, nargs="*", default=[512, 2048])
    ap.add_argument("--kinds", nargs="*", default=["flat", "ivf", "hnsw"])
    ap.add_argument("--queries", type=int, default=200, help="unseen rows used as queries")
    ap.add_argument("--budget", type=float, default=3.0, help="seconds of timing per row")
    ap.add_argument("--threads", type=int, default=None, help="FAISS threads (default: all)")
    ap.add_argument("--demo-rows", type=Path, default=HERE / "cache" / "demo_rows.npz")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--name", default="search", help="results file stem (<name>.json, <name>.md)")
    args = ap.parse_args()
    threads = set_num_threads(args.threads)
    threadpool_limits(limits=threads, user_api="blas")  # numpy baseline: same thread count
    sizes = [int(s) for s in args.sizes] + ([1_000_000] if args.large else [])
    datasets = []  # (label, n, d, method, generator(n_total, seed))
    for d in args.dims:
        for n in sizes:
            for method in ("tracin", "retrac"):
                gen = lambda m, s, d=d, me=method: synthetic(m, d, me, s)  # noqa: E731
                datasets.append(("synthetic", n, d, method, gen))
    cache = args.demo_rows
    if cache.exists():
        with np.load(cache) as z:
            real = {m: np.asarray(z[m], dtype=np.float32) for m in ("tracin", "retrac")}
        for method, rows in real.items():
            fit = fit_generator(rows)
            nq = min(args.queries, len(rows) // 5)
            datasets.append(("real", len(rows) - nq, rows.shape[1], method, lambda m, s, r=rows: r))
            for n in sizes:
                gen = lambda m, s, f=fit: fitted(f, m, s)  # noqa: E731
                datasets.append(("fitted", n, rows.shape[1], method, gen))
    else:
        print(f"{cache} not found: synthetic data only")
    res = {"machine": machine(), "threads": threads, "n_queries": args.queries, "configs": []}
    t0 = time.perf_counter()
    for label, n, d, method, gen in datasets:
        print(f"{label} N={n:,} D={d} {method} ({time.perf_counter() - t0:.0f} s)", flush=True)
        rows = gen(n + args.queries, 1000 + n + d)
        x, q = np.ascontiguousarray(rows[:n]), np.ascontiguousarray(rows[n:])
        del rows
        cfg = {"data": label, "n": n, "d": d, "method": method}
        cfg["rows"] = bench_one(x, q, method, args.kinds, args.budget)
        res["configs"].append(cfg)
        del x, q
    res["total_seconds"] = time.perf_counter() - t0
    res["load_average_at_end"] = os.getloadavg()
    res["checks"] = checks(res)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(res, indent=2, sort_keys=True) + "\n")
    (args.out / f"{args.name}.md").write_text(to_markdown(res))
    print("\n".join(res["checks"]))
    print(f"wrote {args.out / args.name}.json and .md in {res['total_seconds']:.0f} s")


if __name__ == "__main__":
    main()
