"""On-disk IVF benchmark: memory of building, opening and searching it vs the IVF in RAM.

N = 2e5 ReTrac-like rows (unit norm, clustered; ``bench_search.synthetic``), D = 512, in an
HDF5 store. Builds the on-disk IVF from the store in chunks (``gradindex.search.ondisk.build_ondisk``)
and the in-RAM IVF of the search layer (``VectorIndex.build(kind="ivf")``, the matrix loaded
whole; same training sample and seed, so the same quantizer). Each phase runs in a fresh
process. Memory: the peak anonymous RSS (sampled every 5 ms from outside the process: what
must fit in RAM), and after the searches the anonymous and file-backed parts (file-backed:
mapped pages of the index files, page cache the OS can drop), each minus the same process after
its imports (baseline). Variants opened: in RAM (read), in RAM memory-mapped (``mmap=True``),
on disk.

Writes ``benchmarks/results/ondisk.json`` and ``.md``.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/bench_ondisk.py [--n 200000] [--d 512]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def mem() -> dict[str, float]:
    """VmHWM, VmRSS, RssAnon, RssFile of this process in MiB."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":")[0]
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                out[key] = round(int(line.split()[1]) / 1024, 1)
    return out


def phase_data(work: Path, n: int, d: int) -> dict:
    import h5py

    sys.path.insert(0, str(HERE))
    from bench_search import synthetic

    x = synthetic(n, d, "retrac", seed=0)
    with h5py.File(work / "store.h5", "w") as f:
        f.create_dataset("retrac", data=x)
    return {"bytes": int(x.nbytes)}


def phase_build(work: Path, n: int, d: int) -> dict:
    import h5py

    from gradindex.search.faiss_index import set_num_threads
    from gradindex.search.ondisk import build_ondisk
    from gradindex.store.vectors import ChunkedRows

    set_num_threads(1)
    before = mem()
    t0 = time.perf_counter()
    with h5py.File(work / "store.h5", "r") as f:
        idx = build_ondisk(ChunkedRows(f["retrac"]), work / "ondisk.faiss", "retrac")
    return {"seconds": round(time.perf_counter() - t0, 1), "mem_before": before,
            "mem": mem(), "info": {k: v for k, v in idx.info.items() if k != "ladder"}}  # fmt: skip


def phase_ram(work: Path, n: int, d: int) -> dict:
    """The in-RAM IVF of the search layer (``kind="ivf"``) over the whole matrix, saved."""
    import h5py

    from gradindex.search.faiss_index import VectorIndex, set_num_threads

    set_num_threads(1)
    before = mem()
    t0 = time.perf_counter()
    with h5py.File(work / "store.h5", "r") as f:
        x = f["retrac"][()]
    idx = VectorIndex.build(x, "retrac", kind="ivf")
    idx.save(work / "ram.faiss")
    return {"seconds": round(time.perf_counter() - t0, 1), "mem_before": before, "mem": mem(),
            "info": {k: v for k, v in idx.info.items() if k != "ladder"}}  # fmt: skip


def phase_search(work: Path, variant: str, n: int, d: int) -> dict:
    import numpy as np

    from gradindex.search.faiss_index import VectorIndex, set_num_threads

    set_num_threads(1)
    rng = np.random.default_rng(7)
    q = rng.standard_normal((1000, d), dtype=np.float32)
    base = mem()
    t0 = time.perf_counter()
    path = work / ("ondisk.faiss" if variant == "ondisk" else "ram.faiss")
    idx = VectorIndex.load(path, mmap=variant == "ram_mmap")
    open_s = time.perf_counter() - t0
    opened = mem()
    lat = []
    for i in range(200):
        t = time.perf_counter()
        idx.search(q[i : i + 1], 10)
        lat.append(time.perf_counter() - t)
    t = time.perf_counter()
    res = idx.search(q, 10)
    batch_qps = len(q) / (time.perf_counter() - t)
    searched = mem()
    t = time.perf_counter()
    ex = idx.search(q[:10], 10, exact=True)
    exact_s = (time.perf_counter() - t) / 10
    np.save(work / f"rows_{variant}.npy", res.rows)
    np.save(work / f"exact_{variant}.npy", ex.rows)
    return {"mem_baseline": base, "mem_opened": opened, "mem_searched": searched, "mem_end": mem(),
            "open_ms": round(open_s * 1e3, 1), "p50_ms": round(float(np.median(lat)) * 1e3, 3),
            "batch_qps": round(batch_qps), "exact_ms_per_query": round(exact_s * 1e3, 1)}  # fmt: skip


def run_phase(name: str, work: Path, args: argparse.Namespace, *extra: str) -> dict:
    """Run a phase in a fresh process; this process samples the child's RssAnon every 5 ms
    (a high-water mark of the anonymous memory, which /proc does not keep)."""
    cmd = [sys.executable, __file__, "--phase", name, "--work", str(work)]
    cmd += ["--n", str(args.n), "--d", str(args.d), *extra]
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(cmd, stdout=out, text=True)
        peak_anon = 0.0
        while proc.poll() is None:
            try:
                with open(f"/proc/{proc.pid}/status") as f:
                    for line in f:
                        if line.startswith("RssAnon:"):
                            peak_anon = max(peak_anon, int(line.split()[1]) / 1024)
            except (OSError, ValueError):
                pass
            time.sleep(0.005)
        if proc.returncode:
            raise SystemExit(f"phase {name} failed ({proc.returncode})")
        out.seek(0)
        result = json.loads(out.read().strip().splitlines()[-1])
    result["peak_anon"] = round(peak_anon, 1)
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--phase", default=None)
    ap.add_argument("--variant", default=None)
    ap.add_argument("--work", default=None)
    args = ap.parse_args()
    if args.phase:
        work = Path(args.work)
        fn = {"data": phase_data, "build": phase_build, "ram": phase_ram}.get(args.phase)
        out = fn(work, args.n, args.d) if fn else phase_search(work, args.variant, args.n, args.d)
        print(json.dumps(out))
        return

    import numpy as np

    started = time.time()
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(dir=HERE) as tmp:
        work = Path(tmp)
        data = run_phase("data", work, args)
        build = run_phase("build", work, args)
        ram_build = run_phase("ram", work, args)
        variants = ("ram", "ram_mmap", "ondisk")
        search = {v: run_phase("search", work, args, "--variant", v) for v in variants}
        same = {
            v: bool(np.array_equal(np.load(work / "rows_ram.npy"), np.load(work / f"rows_{v}.npy")))
            for v in variants
        }
        same_exact = {
            v: bool(
                np.array_equal(np.load(work / "exact_ram.npy"), np.load(work / f"exact_{v}.npy"))
            )
            for v in variants
        }
        sizes = {p.name: p.stat().st_size for p in work.iterdir() if p.is_file()}
    import faiss

    result = {
        "n": args.n,
        "d": args.d,
        "matrix_mib": round(data["bytes"] / 2**20, 1),
        "machine": f"{platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} "
        f"usable cores, {platform.platform()}; faiss {faiss.__version__}; OMP_NUM_THREADS="
        f"{os.environ.get('OMP_NUM_THREADS')}; load average {load0:.1f} at start, "
        f"{os.getloadavg()[0]:.1f} at end",
        "build": build,
        "ram_build": ram_build,
        "search": search,
        "same_top10_as_ram": same,
        "same_exact_top10_as_ram": same_exact,
        "file_bytes": sizes,
        "seconds": round(time.time() - started, 1),
    }
    (HERE / "results" / "ondisk.json").write_text(
        json.dumps(result, indent=2, sort_keys=True) + "\n"
    )
    (HERE / "results" / "ondisk.md").write_text(markdown(result))
    print(markdown(result))


def markdown(r: dict) -> str:
    b, rb = r["build"], r["ram_build"]
    base = r["search"]["ram"]

    def anon_peak(p: dict) -> float:
        return p["peak_anon"] - p["mem_before"]["RssAnon"]

    lines = [
        "# On-disk IVF: memory of building, opening and searching",
        "",
        f"Machine: {r['machine']}.",
        "",
        f"N = {r['n']:,} ReTrac-like rows, D = {r['d']} ({r['matrix_mib']} MiB of float32), "
        f"{b['info']['factory']}. Each phase is a fresh process. Anonymous memory (RssAnon: must "
        "fit in RAM) is sampled every 5 ms from outside; file-backed memory (RssFile: mapped "
        "index pages, page cache the OS can drop) is read after the searches; both minus the "
        "same process after its imports.",
        "",
        "| build | seconds | peak anonymous MiB above imports | nprobe | recall@10 vs exact |",
        "|---|---|---|---|---|",
        f"| in RAM (`kind='ivf'`, matrix loaded whole) | {rb['seconds']} | {anon_peak(rb):.0f} | "
        f"{rb['info']['knobs'].get('nprobe')} | {rb['info']['recall_at_10']:.3f} |",
        f"| on disk (`build_ondisk`, store read in chunks; {b['info']['ondisk']['partial_indexes']}"
        f" partial indexes, {b['info']['ondisk']['train_rows']:,} training rows) | {b['seconds']} "
        f"| {anon_peak(b):.0f} | {b['info']['knobs'].get('nprobe')} | "
        f"{b['info']['recall_at_10']:.3f} |",
        "",
        "Searches: 200 single queries (p50), then one batch of 1000, then 10 exact queries.",
        "",
        "| opened as | open ms | anonymous MiB above baseline (peak) | file-backed MiB after "
        "searches | p50 ms (1 query) | batch q/s | exact ms/query | same top-10 as in RAM "
        "(approx / exact) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for v, s in r["search"].items():
        anon = s["peak_anon"] - s["mem_baseline"]["RssAnon"]
        file = s["mem_searched"]["RssFile"] - s["mem_baseline"]["RssFile"]
        lines.append(
            f"| {v} | {s['open_ms']} | {anon:.0f} | {file:.0f} | {s['p50_ms']} | "
            f"{s['batch_qps']} | {s['exact_ms_per_query']} | {r['same_top10_as_ram'][v]} / "
            f"{r['same_exact_top10_as_ram'][v]} |"
        )
    lines += ["", f"Total benchmark time {r['seconds']} s.", ""]
    del base
    return "\n".join(lines)


if __name__ == "__main__":
    main()
