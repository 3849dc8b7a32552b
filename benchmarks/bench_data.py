"""Data-path benchmark: lazy sources, sliced reads, and an index that opens in constant memory.

Phases, each measured in a fresh process (peak RSS = the process's VmHWM, which counts
file-backed mapped pages too):

- ``open``: an index of N rows (D = 16) grown synthetically from a real 300-row build through
  the store's own writer (``VectorStore.create`` / ``write_rows``), on-disk IVF lists
  (``build_ondisk``, nlist 1024); ``AttributionIndex.open`` + 20 searches (k = 10, ids
  mapped): peak RSS and latency, N = 1e4 vs 1e7.
- ``datapath``: a source of N tiny images (8x8 uint8 ``.npy``, memory-mapped) streamed into a
  ``VectorStore`` through ``prefetch`` with a stand-in featurizer (a fixed random projection
  of the pixels): peak RSS, N = 1e4 vs 1e6.
- ``shards``: 4 shard views over WebDataset tars: bytes each read vs the bytes of its members.
- ``formats``: rows/s reading every row of 3000 32x32 RGB images per format, and the
  ``webdataset`` package streaming the same tars.
- ``overlap``: ``build_index`` (tiny UNet) over an image folder vs the same pixels as an array
  in memory (featurize only): rows/s and cores busy, alternated over 7 counted rounds, the
  median of the per-round ratios; at the cheapest spec and at the default one.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/bench_data.py [--phases open,datapath,...]

Writes ``benchmarks/results/data.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def maxrss_mib() -> float:
    """Peak RSS of this process (VmHWM; ru_maxrss would carry a forking parent's peak over
    exec). Both count file-backed mapped pages."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def tiny_unet(seed: int = 1, size: int = 8, channels: int = 1):
    import torch
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=size, in_channels=channels, out_channels=channels, layers_per_block=1,
        block_out_channels=(8, 16), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4, attention_head_dim=8,
    ).eval()  # fmt: skip


def digits(n: int) -> np.ndarray:
    from sklearn.datasets import load_digits

    d = np.round(load_digits().images * 255 / 16).astype(np.uint8)
    return d[np.arange(n) % len(d)]


# -- open: constant-memory open and query ----------------------------------------------------


def template(work: Path) -> Path:
    from diffusers import DDPMScheduler

    import gradindex as gi

    out = work / "template"
    if not (out / "manifest.json").exists():
        gi.build_index(
            checkpoints=[(tiny_unet(), DDPMScheduler(num_train_timesteps=1000))],
            data=digits(300), out=out, progress=False, fidelity_sample=0,
            spec=gi.BuildSpec(proj_dim=16, timesteps=1, batch_size=64),
        )  # fmt: skip
    return out


def grow(tmpl: Path, out: Path, n: int, nlist: int = 1024) -> float:
    """An index folder of n synthetic rows with the template's manifest, spec and build id."""
    import h5py
    from bench_search import synthetic

    from gradindex.search.ondisk import _stamp_build_id, build_ondisk
    from gradindex.store.kernel import write_kernel
    from gradindex.store.layout import (
        MANIFEST,
        VECTORS,
        faiss_file,
        file_records,
        write_json_atomic,
    )
    from gradindex.store.vectors import ChunkedRows, VectorStore

    started = time.perf_counter()
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(tmpl, out, ignore=shutil.ignore_patterns("*.faiss*", "vectors.h5"))
    man = json.loads((out / MANIFEST).read_text())
    with VectorStore.open(tmpl / VECTORS) as t:
        dim, norms_shape = t.dim, t.file["norms"].shape[1:]
        attrs = {"spec": str(t.attr("spec")), "format_version": int(t.attr("format_version"))}
        dtype = str(t.file["tracin"].dtype)
    store = VectorStore.create(out / VECTORS, np.arange(n), dim, *norms_shape, dtype, attrs)
    store.file.attrs["build_id"] = man["build_id"]
    step = 1 << 20
    for a in range(0, n, step):
        x = synthetic(min(step, n - a), dim, "retrac", seed=a)
        z = np.zeros(len(x), np.uint8)
        store.write_rows(a, x * 2.0, x, np.ones((len(x), *norms_shape), np.float32), z)
    store.close()
    indexes = {}
    with h5py.File(out / VECTORS, "r") as f:
        for method in ("tracin", "retrac"):
            path = out / faiss_file(method)
            vi = build_ondisk(ChunkedRows(f[method]), path, method, nlist=min(nlist, n // 40))
            _stamp_build_id(path, man["build_id"])
            indexes[method] = {**vi.info, "build_id": man["build_id"]}
    kernel = write_kernel(out, [1.0], man["build_id"])
    man.update(num_rows=n, num_flagged=0, indexes=indexes, kernel=kernel)
    man["files"] = file_records(out)
    write_json_atomic(out / MANIFEST, man)
    return round(time.perf_counter() - started, 1)


def status_mib() -> dict[str, float]:
    """VmHWM (peak), RssAnon (heap: must fit in RAM), RssFile (mapped file pages: page cache
    the kernel may drop) of this process, MiB."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":")[0]
            if key in ("VmHWM", "RssAnon", "RssFile"):
                out[key] = round(int(line.split()[1]) / 1024, 1)
    return out


def child_open(folder: str) -> dict:
    import h5py

    from gradindex.query import AttributionIndex

    with h5py.File(Path(folder) / "vectors.h5", "r") as f:
        n = f["ids"].shape[0]
        rows = np.sort(np.random.default_rng(0).choice(n, 20, replace=False))
        q = np.asarray(f["retrac"][rows], np.float32)
    mem = {"after_imports": status_mib()}
    t0 = time.perf_counter()
    idx = AttributionIndex.open(folder)
    opened = time.perf_counter() - t0
    mem["after_open"] = status_mib()
    times, found = [], 0
    for i in range(len(q)):
        t0 = time.perf_counter()
        res = idx.search(q[i : i + 1], k=10, method="retrac")
        times.append(time.perf_counter() - t0)
        found += int(res.rows[0, 0] == rows[i])
        if i == 0:
            mem["after_1_query"] = status_mib()
    mem["after_20_queries"] = status_mib()
    return {
        "rows": len(idx), "memory_mib": mem, "open_s": round(opened, 3),
        "search_ms_median": round(1e3 * float(np.median(times)), 2),
        "search_ms_first": round(1e3 * times[0], 2), "queries_finding_themselves": found,
        "nprobe": idx.manifest["indexes"]["retrac"].get("knobs"),
        "nlist": idx.manifest["indexes"]["retrac"].get("nlist"),
    }  # fmt: skip


def phase_open(work: Path, sizes: list[int], nlist: int = 1024) -> dict:
    tmpl = template(work)
    out = {}
    for n in sizes:
        folder = work / (f"idx-{n}" + (f"-nlist{nlist}" if nlist != 1024 else ""))
        grown = None if (folder / "manifest.json").exists() else grow(tmpl, folder, n, nlist)
        out[str(n)] = {**run_child("open", str(folder)), "write_s": grown}
    return out


# -- datapath: RSS of source -> store flat in N ----------------------------------------------


def child_datapath(npy: str) -> dict:
    from gradindex.inputs.pixels import to_model_input
    from gradindex.inputs.sources import prefetch
    from gradindex.inputs.training_data import open_source
    from gradindex.store.vectors import VectorStore

    base = maxrss_mib()
    src = open_source(npy, 1)
    proj = np.random.default_rng(0).standard_normal((64, 16)).astype(np.float32)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=Path(npy).parent) as tmp:
        store = VectorStore.create(Path(tmp) / "v.h5", src.ids, 16, 1, 1, "float32", {})
        spans = ((a, min(a + 256, len(src))) for a in range(0, len(src), 256))
        for a, b, px in prefetch(src, spans):
            x = to_model_input(px, channels=1, size=8, data_range=src.data_range()).numpy()
            v = x.reshape(len(x), -1) @ proj  # the stand-in featurizer
            store.write_rows(a, v, v, np.ones((b - a, 1, 1), np.float32), np.zeros(b - a))
        store.close()
    secs = time.perf_counter() - started
    return {
        "rows": len(src), "rss_after_imports_mib": base, "peak_rss_mib": maxrss_mib(),
        "rows_per_s": round(len(src) / secs), "bytes_read": src.bytes_read,
    }  # fmt: skip


def phase_datapath(work: Path, sizes: list[int]) -> dict:
    out = {}
    for n in sizes:
        npy = work / f"tiny-{n}.npy"
        arr = np.lib.format.open_memmap(npy, "w+", np.uint8, (n, 8, 8))
        for a in range(0, n, 1 << 16):
            arr[a : a + (1 << 16)] = digits(min(1 << 16, n - a))
        arr.flush()
        del arr
        out[str(n)] = run_child("datapath", str(npy))
        npy.unlink()
    return out


# -- shards, formats, overlap ----------------------------------------------------------------


def write_tars(root: Path, pixels: np.ndarray, shards: int) -> str:
    from PIL import Image

    for s, rows in enumerate(np.array_split(np.arange(len(pixels)), shards)):
        with tarfile.open(root / f"s-{s:03d}.tar", "w") as tf:
            for i in rows:
                buf = io.BytesIO()
                Image.fromarray(pixels[i]).save(buf, format="PNG")
                for ext, data in ((".png", buf.getvalue()), (".cls", b"1")):
                    info = tarfile.TarInfo(f"{i:06d}{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
    return str(root / f"s-{{000..{shards - 1:03d}}}.tar")


def phase_shards(work: Path, n: int = 20000) -> dict:
    from gradindex.inputs.slices import shard_rows
    from gradindex.inputs.tars import expand_braces
    from gradindex.inputs.training_data import open_source

    (work / "tars").mkdir(exist_ok=True)
    pattern = write_tars(work / "tars", digits(n), 8)
    sizes = {}
    for p in expand_braces(pattern):
        with tarfile.open(p) as tf:
            sizes.update({m.name[:6]: m.size for m in tf if m.name.endswith(".png")})
    total = sum(os.path.getsize(p) for p in expand_braces(pattern))
    ranks = []
    for i in range(4):
        view = open_source(pattern, 1).rows(*shard_rows((i, 4), n))
        for a in range(0, len(view), 512):
            view.read(a, a + 512)
        own = sum(sizes[str(k)[:6]] for k in view.ids)
        ranks.append({"rank": i, "rows": len(view), "bytes_read": view.bytes_read, "own": own})
    return {"rows": n, "tar_bytes": total, "ranks": ranks}


def phase_formats(work: Path, n: int = 3000) -> dict:
    import h5py
    from PIL import Image

    from gradindex.inputs.training_data import open_source

    rgb = np.repeat(np.kron(digits(n), np.ones((4, 4), np.uint8))[..., None], 3, axis=-1)
    root = work / "fmt"
    shutil.rmtree(root, ignore_errors=True)
    (root / "folder").mkdir(parents=True)
    (root / "tars").mkdir()
    np.save(root / "d.npy", rgb)
    with h5py.File(root / "d.h5", "w") as f:
        f["images"] = rgb
    for i, p in enumerate(rgb):
        Image.fromarray(p).save(root / "folder" / f"{i:06d}.png")
    pattern = write_tars(root / "tars", rgb, 4)
    hf = hf_dataset(rgb)
    hf.save_to_disk(str(root / "hf"))
    hf.to_parquet(str(root / "d.parquet"), batch_size=256)
    data = {
        "npy": str(root / "d.npy"), "hdf5": f"{root / 'd.h5'}:/images",
        "image folder": str(root / "folder"), "datasets save_to_disk": str(root / "hf"),
        "parquet": str(root / "d.parquet"), "WebDataset tar (tarfile)": pattern,
    }  # fmt: skip
    out = {}
    for name, d in data.items():
        t0 = time.perf_counter()
        src = open_source(d, 3)
        listed = time.perf_counter() - t0
        for a in range(0, n, 256):
            src.read(a, a + 256)
        secs = time.perf_counter() - t0
        out[name] = {"rows_per_s": round(n / secs), "open_s": round(listed, 3)}
    out["WebDataset tar (webdataset pkg)"] = webdataset_rate(pattern, n)
    return out


def hf_dataset(rgb: np.ndarray):
    import datasets
    from PIL import Image

    def png(p):
        buf = io.BytesIO()
        Image.fromarray(p).save(buf, format="PNG")
        return {"bytes": buf.getvalue(), "path": None}

    feats = datasets.Features(image=datasets.Image(), id=datasets.Value("string"))
    cols = {"image": [png(p) for p in rgb], "id": [f"{i:06d}" for i in range(len(rgb))]}
    return datasets.Dataset.from_dict(cols, features=feats)


def webdataset_rate(pattern: str, n: int) -> dict:
    """The webdataset package streaming the same shards, decoding with the same PIL call."""
    import webdataset as wds

    from gradindex.inputs.pixels import decode_image

    t0 = time.perf_counter()
    count = 0
    for sample in wds.WebDataset(pattern, shardshuffle=False):
        decode_image(io.BytesIO(sample["png"]), sample["__key__"], 3)
        count += 1
    secs = time.perf_counter() - t0
    return {"rows_per_s": round(count / secs), "open_s": 0.0, "rows": count}


ROUNDS = 8  # the first is a warm-up, not counted
OVERLAP_SPECS = {  # the cheapest featurizing (decoding's largest share), and the defaults
    "tiny spec (K = 2, d = 16, batch 64)": {"proj_dim": 16, "timesteps": 2, "batch_size": 64},
    "default spec (K = 10, d = 4096, batch 16)": {},
}
ARRAY, FOLDER = "featurize only (array in memory)", "image folder"


def phase_overlap(work: Path, n: int = 1500) -> dict:
    from PIL import Image

    px = digits(n)
    folder = work / "overlap"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    for i, p in enumerate(px):
        Image.fromarray(p).save(folder / f"{i:06d}.png")
    out: dict = {"rows": n}
    for label, spec in OVERLAP_SPECS.items():
        rounds = [overlap_round(work, px, str(folder), spec) for _ in range(ROUNDS)]
        out[label] = {"rounds": rounds[1:]}  # the first round warms caches and torch
        out[label]["folder_vs_array"] = float(np.median([r["ratio"] for r in rounds[1:]]))
    return out


def overlap_round(work: Path, px: np.ndarray, folder: str, spec: dict) -> dict:
    """One build from the array, then one from the folder: paired, as the rate drifts."""
    from diffusers import DDPMScheduler

    import gradindex as gi

    got: dict = {}
    for name, data in ((ARRAY, px), (FOLDER, folder)):
        t0, c0 = time.perf_counter(), os.times()
        idx = gi.build_index(
            checkpoints=[(tiny_unet(), DDPMScheduler(num_train_timesteps=1000))], data=data,
            out=work / "ov", progress=False, fidelity_sample=0, overwrite=True,
            spec=gi.BuildSpec(**spec),
        )  # fmt: skip
        secs, c1 = time.perf_counter() - t0, os.times()
        cpu = (c1.user - c0.user) + (c1.system - c0.system)
        got[name] = {"rows_per_s": round(len(px) / secs, 1), "cores_busy": round(cpu / secs, 2),
                     **idx.manifest["data_seconds"]}  # fmt: skip
    got["ratio"] = round(got[FOLDER]["rows_per_s"] / got[ARRAY]["rows_per_s"], 3)
    return got


# -- driver ----------------------------------------------------------------------------------


def run_child(phase: str, arg: str) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{HERE.parent}:{HERE}"}
    cmd = [sys.executable, __file__, "--child", phase, arg]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if res.returncode:
        raise RuntimeError(res.stderr[-3000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--phases", default="open,datapath,shards,formats,overlap")
    ap.add_argument("--open-sizes", default="10000,10000000")
    ap.add_argument("--data-sizes", default="10000,1000000")
    ap.add_argument("--work", default=None)
    ap.add_argument("--nlist", type=int, default=1024)
    ap.add_argument("--child", nargs=2, default=None)
    args = ap.parse_args()
    if args.child:
        fn = {"open": child_open, "datapath": child_datapath}[args.child[0]]
        print(json.dumps(fn(args.child[1])))
        return
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_data_"))  # --work: a bigger disk
    work.mkdir(parents=True, exist_ok=True)
    path = HERE / "results" / "data.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    for phase in args.phases.split(","):
        t0 = time.perf_counter()
        if phase == "open":
            sizes = [int(s) for s in args.open_sizes.split(",")]
            key = "open" if args.nlist == 1024 else f"open_nlist{args.nlist}"
            results[key] = phase_open(work, sizes, args.nlist)
        elif phase == "datapath":
            results[phase] = phase_datapath(work, [int(s) for s in args.data_sizes.split(",")])
        else:
            results[phase] = {"shards": phase_shards, "formats": phase_formats,
                              "overlap": phase_overlap}[phase](work)  # fmt: skip
        print(phase, round(time.perf_counter() - t0, 1), "s", json.dumps(results.get(phase)))
        results["machine"] = {"cpus": os.cpu_count(), "omp": os.environ.get("OMP_NUM_THREADS")}
        path.write_text(json.dumps(results, indent=1) + "\n")
    (HERE / "results" / "data.md").write_text(markdown(results))


def markdown(r: dict) -> str:
    lines = ["# bench_data (`benchmarks/bench_data.py`, raw figures in data.json)", ""]
    for key in [k for k in r if k.startswith("open")]:
        lines += [f"## {key}: open + query, peak RSS (VmHWM) / heap (RssAnon) / mapped files, MiB",
                  "", "| rows | after open | after 1 query | after 20 queries | search ms (median) |",
                  "|---|---|---|---|---|"]  # fmt: skip
        for n, v in r[key].items():
            m = v["memory_mib"]
            cell = [f"{m[s]['VmHWM']} / {m[s]['RssAnon']} / {m[s]['RssFile']}"
                    for s in ("after_open", "after_1_query", "after_20_queries")]  # fmt: skip
            lines.append(f"| {int(n):,} | {' | '.join(cell)} | {v['search_ms_median']} |")
        lines.append("")
    if "datapath" in r:
        lines += ["## datapath: .npy source -> VectorStore, stand-in featurizer", "",
                  "| rows | peak RSS MiB | after imports | rows/s |", "|---|---|---|---|"]  # fmt: skip
        for n, v in r["datapath"].items():
            lines.append(
                f"| {int(n):,} | {v['peak_rss_mib']} | {v['rss_after_imports_mib']} | "
                f"{v['rows_per_s']:,} |"
            )
        lines.append("")
    if "formats" in r:
        lines += ["## formats: read + decode 3,000 32x32 RGB images", "",
                  "| source | rows/s | open s |", "|---|---|---|"]  # fmt: skip
        lines += [f"| {k} | {v['rows_per_s']:,} | {v['open_s']} |" for k, v in r["formats"].items()]
        lines.append("")
    if "shards" in r:
        sh = r["shards"]
        lines += [f"## shards: 4 shard views over {sh['rows']:,} images in tars of "
                  f"{sh['tar_bytes']:,} bytes", "", "| rank | rows | bytes read | own bytes |",
                  "|---|---|---|---|"]  # fmt: skip
        lines += [f"| {x['rank']} | {x['rows']} | {x['bytes_read']:,} | {x['own']:,} |"
                  for x in sh["ranks"]]  # fmt: skip
        lines.append("")
    if "overlap" in r:
        for label, ov in r["overlap"].items():
            if not isinstance(ov, dict) or "rounds" not in ov:
                continue
            lines += [f"## overlap, {label}: build_index of {r['overlap']['rows']} images, "
                      "rows/s (cores busy)", "", "| round | array in memory | image folder | "
                      "ratio | folder: decoding s / featurizer waited s |",
                      "|---|---|---|---|---|"]  # fmt: skip
            for i, x in enumerate(ov["rounds"], 1):
                a, b = (f"{x[k]['rows_per_s']} ({x[k]['cores_busy']})" for k in (ARRAY, FOLDER))
                f = x[FOLDER]
                waits = f"{f.get('reading_s', '-')} / {f.get('waiting_s', '-')}"
                lines.append(f"| {i} | {a} | {b} | {x['ratio']} | {waits} |")
            lines += ["", f"Median ratio folder / array: **{ov['folder_vs_array']}**", ""]
    lines.append(f"Machine: {r.get('machine')}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
