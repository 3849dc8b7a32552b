r"""GPU check: CUDA featurizing, projection and FAISS search against the CPU, one machine, one run.

Run where there is a CUDA GPU (CI has none; this is the one short check a GPU machine gets):

1. ``build``: whole builds with the default spec over load_digits on the demo UNet and the ~9×
   larger one, on the CPU (every core) and on CUDA: stored rows compared (relative error,
   top-10 neighbours of held-out queries) and per-draw gradients/s. CUDA runs in strict float32
   and with TF32 convolutions (torch's default), with bigger batches (a GPU has room for them),
   and with the per-item autograd loop (the reference approach) on the GPU.
2. ``projection``: SJLT throughput and agreement for p ∈ {10⁶, 10⁷}, d = 4096, CPU vs CUDA.
3. ``faiss``: when faiss-gpu is importable and sees a GPU, flat and IVF indexes cloned to it
   answer like the CPU ones (top-10), with the speedup; otherwise the reason it did not run.
4. ``cifar`` (not in the default sections; ``gpu_cifar.py``): issue 29's GPU item, the
   35.7M-parameter CIFAR-10 DDPM architecture on one device: the per-sample loop, the default
   build at batch 16 / 64 / 128, sjlt on the full path, TRAK's CUDA projector if it imports,
   the rows against a CPU build; each part guarded, under ``--budget-s``.

Writes ``gpu.json`` and ``gpu.md`` (``cifar``: ``gpu_cifar.json`` and ``gpu_cifar.md``) to
``--out`` (default ``benchmarks/results``).

    python benchmarks/bench_gpu.py --out /tmp/gpu

The GPU session's command for ``cifar`` (one H100 or H200; the parts stop before 360 s). The
device image has no diffusers or faiss: fetch their wheels here into an ignored ``.whl``

    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 -d .whl \
        diffusers==0.42.1 faiss-cpu==1.15.1

then run there (carry ``.whl``, timeout 480 s; copy what comes back to benchmarks/results):

    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
        && PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 python3 benchmarks/bench_gpu.py \
        --sections cifar --budget-s 360 --out $OUT

and on a CPU, the same parts on a tiny UNet in seconds (``gpu_cifar_tiny.*``; the test):

    python benchmarks/bench_gpu.py --sections cifar --device cpu --tiny --out /tmp/gpu
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from bench_featurize import DEMO_UNET, LARGE_UNET, _timed, _unet, loop_draw_rows
from gpu_cifar import section_cifar

from gradindex.demo.training import load_digits_images

HERE = Path(__file__).resolve().parent


def _build(
    model_cfg: dict, images: np.ndarray, device: str, out: str, loop: bool = False, **spec_kw
) -> dict:
    from diffusers import DDPMScheduler

    import gradindex as gi
    from gradindex.featurize.gradients import GradientFeaturizer

    model = _unet(model_cfg)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    batched = GradientFeaturizer._draw_rows
    if loop:
        GradientFeaturizer._draw_rows = loop_draw_rows
    try:
        start = time.perf_counter()
        idx = gi.build_index(
            checkpoints=[(model, DDPMScheduler(num_train_timesteps=1000))],
            data=images,
            out=out,
            spec=gi.BuildSpec(**spec_kw),
            index="flat",
            device=device,
            progress=False,
        )
        seconds = time.perf_counter() - start
    finally:
        GradientFeaturizer._draw_rows = batched
    draws = len(images) * idx.spec.num_timesteps * idx.spec.noise_draws
    res = {
        "device": device,
        "seconds": seconds,
        "per_draw_grads_per_s": draws / seconds,
        "rows": {m: idx.vectors(m).copy() for m in ("tracin", "retrac")},
        "norms": idx.norms.copy(),
    }
    if device.startswith("cuda"):
        res["gpu_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return res


def _agreement(a: dict, b: dict, queries: int = 64) -> dict:
    """Relative error of b's rows/norms against a's, and top-10 overlap of held-out queries."""
    out = {}
    queries = min(queries, len(a["norms"]) // 4)
    for m in ("tracin", "retrac"):
        x, y = a["rows"][m].astype(np.float64), b["rows"][m].astype(np.float64)
        q, xb, yb = x[:queries], x[queries:], y[queries:]  # first rows act as queries
        top_x = np.argsort(-(q @ xb.T), axis=1)[:, :10]
        top_y = np.argsort(-(y[:queries] @ yb.T), axis=1)[:, :10]
        overlap = np.mean([len(set(r) & set(s)) / 10 for r, s in zip(top_x, top_y)])
        out[m] = {
            "rel_error": float(np.linalg.norm(x - y) / np.linalg.norm(x)),
            "max_row_rel_error": float(
                (np.linalg.norm(x - y, axis=1) / np.linalg.norm(x, axis=1)).max()
            ),
            "top10_overlap": float(overlap),
        }
    n1, n2 = a["norms"].astype(np.float64), b["norms"].astype(np.float64)
    out["norms_max_rel_error"] = float(np.abs(n1 - n2).max() / np.abs(n1).max())
    return out


# (mode, device, TF32 allowed in cuDNN convolutions, images per gradient batch, per-item loop)
MODES = [
    ("cpu", "cpu", False, 16, False),
    ("cpu_b64", "cpu", False, 64, False),
    ("cuda_fp32", "cuda", False, 16, False),
    ("cuda_tf32", "cuda", True, 16, False),
    ("cuda_fp32_b64", "cuda", False, 64, False),
    ("cuda_fp32_b256", "cuda", False, 256, False),
    ("cuda_loop", "cuda", False, 16, True),
]


def section_build(n_images: dict[str, int], loop_images: int) -> list[dict]:
    import warnings

    rows = []
    for name, cfg in (("demo", DEMO_UNET), ("large", LARGE_UNET)):
        images = load_digits_images(cfg["sample_size"])[: n_images[name]]
        runs = {}
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*search stays on the CPU")
            _build(cfg, images[:64], "cuda", f"{tmp}/warmup")  # CUDA context, cuDNN choices
            for mode, device, tf32, batch, loop in MODES:
                torch.backends.cudnn.allow_tf32 = tf32
                imgs = images[:loop_images] if loop else images
                runs[mode] = _build(cfg, imgs, device, f"{tmp}/{mode}", loop, batch_size=batch)
                print(f"  {name} {mode}: {runs[mode]['per_draw_grads_per_s']:.1f}", flush=True)
        torch.backends.cudnn.allow_tf32 = True  # torch's default
        base = runs["cpu"]["per_draw_grads_per_s"]
        for mode, r in runs.items():
            entry = {
                "model": name,
                "params": sum(p.numel() for p in _unet(cfg).parameters()),
                "images": len(r["rows"]["tracin"]),
                "mode": mode,
                "seconds": r["seconds"],
                "per_draw_grads_per_s": r["per_draw_grads_per_s"],
                "vs_cpu": r["per_draw_grads_per_s"] / base,
                "gpu_peak_mb": r.get("gpu_peak_mb"),
            }
            if mode != "cpu":
                cpu = runs["cpu"]
                if mode == "cuda_loop":  # fewer images: compare against the same CPU rows
                    n = len(r["rows"]["tracin"])
                    cpu = {
                        "rows": {m: v[:n] for m, v in cpu["rows"].items()},
                        "norms": cpu["norms"][:n],
                    }
                entry["agreement_with_cpu"] = _agreement(cpu, r)
            print(f"  {name} {mode}: {json.dumps(entry)}", flush=True)
            rows.append(entry)
    return rows


def section_projection(batch: int = 16) -> list[dict]:
    from gradindex.featurize.projection import make_projector

    rows = []
    for p in (10**6, 10**7):
        x = torch.randn(batch, p)
        proj = make_projector("sjlt", p, 4096, 0, nnz=4)
        cpu_s = _timed(lambda proj=proj, x=x: proj.project(x), 2.0, 1)
        y_cpu = proj.project(x)
        xg = x.cuda()

        def on_gpu(proj=proj, xg=xg):
            proj.project(xg)
            torch.cuda.synchronize()

        gpu_s = _timed(on_gpu, 2.0, 3)
        y_gpu = proj.project(xg).cpu()
        rel = float((y_cpu - y_gpu).norm() / y_cpu.norm())
        rows.append(
            {
                "p": p,
                "d": 4096,
                "cpu_vectors_per_s": batch / cpu_s,
                "gpu_vectors_per_s": batch / gpu_s,
                "speedup": cpu_s / gpu_s,
                "rel_error": rel,
            }
        )
        print(f"  projection {rows[-1]}", flush=True)
    return rows


def section_faiss(n: int = 200_000, d: int = 512, queries: int = 1000) -> dict:
    import faiss

    from gradindex.search.faiss_index import VectorIndex

    status = {
        "faiss": faiss.__version__,
        "gpu_build": hasattr(faiss, "StandardGpuResources"),
        "gpus": faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0,
    }
    if not status["gpu_build"] or status["gpus"] == 0:
        status["ran"] = False
        return status
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, d), dtype=np.float32)
    x *= rng.lognormal(0, 1.0, n).astype(np.float32)[:, None]
    q = rng.standard_normal((queries, d), dtype=np.float32)
    status["ran"] = True
    status["kinds"] = {}
    for kind in ("flat", "ivf"):
        cpu = VectorIndex.build(x, "tracin", kind=kind)
        gpu = VectorIndex.build(x, "tracin", kind=kind)
        moved = gpu.to_gpu()
        cpu_s = _timed(lambda cpu=cpu: cpu.search(q, 10), 2.0, 1)
        gpu_s = _timed(lambda gpu=gpu: gpu.search(q, 10), 2.0, 3)
        a, b = cpu.search(q, 10).rows, gpu.search(q, 10).rows
        status["kinds"][kind] = {
            "moved": moved,
            "cpu_queries_per_s": queries / cpu_s,
            "gpu_queries_per_s": queries / gpu_s,
            "speedup": cpu_s / gpu_s,
            "top10_equal_fraction": float((a == b).mean()),
        }
        print(f"  faiss {kind}: {status['kinds'][kind]}", flush=True)
    return status


def machine() -> dict:
    return {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cuda": torch.version.cuda,
    }


def to_markdown(res: dict) -> str:
    m = res["machine"]
    lines = [
        "# GPU check",
        "",
        f"Machine: {m['gpu']} (CUDA {m['cuda']}), {m['cpus']} CPUs ({m['torch_threads']} torch "
        f"threads), torch {m['torch']}, {m['platform']}. CPU and GPU measured in the same run.",
        "",
        "## Whole build, default spec (sjlt d=4096, K=10)",
        "",
        "| model | images | mode | draws/s | vs CPU | GPU peak MB | TracIn rel. err | ReTrac rel."
        " err | top-10 overlap (TracIn / ReTrac) | norms max rel. err |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res.get("build", []):
        a = r.get("agreement_with_cpu")
        cells = (
            [
                f"{a['tracin']['rel_error']:.1e}",
                f"{a['retrac']['rel_error']:.1e}",
                f"{a['tracin']['top10_overlap']:.3f} / {a['retrac']['top10_overlap']:.3f}",
                f"{a['norms_max_rel_error']:.1e}",
            ]
            if a
            else ["—"] * 4
        )
        peak = f"{r['gpu_peak_mb']:.0f}" if r["gpu_peak_mb"] else "—"
        lines.append(
            f"| {r['model']} ({r['params']:,}) | {r['images']} | {r['mode']} | "
            f"{r['per_draw_grads_per_s']:.1f} | {r['vs_cpu']:.2f}× | {peak} | " + " | ".join(cells)
        )
    lines += [
        "",
        "fp32 / tf32: cuDNN convolutions in strict float32 / allowed TF32 (torch's default); "
        "b64, b256: images per gradient batch (default 16); cuda_loop: the per-item autograd "
        "loop on the GPU (fewer images). An untimed CUDA build warms up first.",
        "",
        "## SJLT projection, d = 4096",
        "",
        "| p | CPU vec/s | GPU vec/s | speedup | rel. error |",
        "|---|---|---|---|---|",
    ]
    for r in res.get("projection", []):
        lines.append(
            f"| {r['p']:.0e} | {r['cpu_vectors_per_s']:.1f} | {r['gpu_vectors_per_s']:.1f} | "
            f"{r['speedup']:.1f}× | {r['rel_error']:.1e} |"
        )
    f = res.get("faiss", {})
    lines += ["", "## FAISS on the GPU", ""]
    if f.get("ran"):
        lines += ["| kind | CPU q/s | GPU q/s | speedup | top-10 equal |", "|---|---|---|---|---|"]
        for kind, r in f["kinds"].items():
            lines.append(
                f"| {kind} | {r['cpu_queries_per_s']:.0f} | {r['gpu_queries_per_s']:.0f} | "
                f"{r['speedup']:.1f}× | {r['top10_equal_fraction']:.3f} |"
            )
    else:
        lines.append(
            f"Not run: faiss {f.get('faiss')} here has GPU support: {f.get('gpu_build')}, sees "
            f"{f.get('gpus')} GPU(s). {res.get('faiss_note', '')}"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--sections",
        nargs="*",
        default=["build", "projection", "faiss"],
        choices=["build", "projection", "faiss", "cifar"],
    )
    ap.add_argument("--demo-images", type=int, default=256)
    ap.add_argument("--large-images", type=int, default=128)
    ap.add_argument("--loop-images", type=int, default=64, help="images in the per-item loop build")
    ap.add_argument("--faiss-note", default="", help="why faiss-gpu is absent, for the table")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--device", default="cuda", help="cifar: the device (cpu with --tiny)")
    ap.add_argument("--tiny", action="store_true", help="cifar: a tiny UNet instead of 35.7M")
    ap.add_argument("--budget-s", type=float, default=420.0, help="cifar: seconds for all parts")
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("bench_gpu.py needs a CUDA GPU; torch sees none here")
    gpu_sections = [s for s in args.sections if s != "cifar"]
    if gpu_sections and not args.device.startswith("cuda"):
        raise SystemExit(f"--device {args.device}: only --sections cifar runs without CUDA")
    res: dict = {"machine": machine(), "faiss_note": args.faiss_note}
    args.out.mkdir(parents=True, exist_ok=True)
    if "cifar" in args.sections:
        section_cifar(args.device, args.tiny, args.budget_s, args.out, machine())
    if not gpu_sections:
        return

    def write() -> None:  # after every section, so a timeout still leaves what finished
        (args.out / "gpu.json").write_text(json.dumps(res, indent=2) + "\n")
        (args.out / "gpu.md").write_text(to_markdown(res))

    if "build" in args.sections:
        sizes = {"demo": args.demo_images, "large": args.large_images}
        res["build"] = section_build(sizes, args.loop_images)
        write()
    if "projection" in args.sections:
        res["projection"] = section_projection()
        write()
    if "faiss" in args.sections:
        res["faiss"] = section_faiss()
        write()
    print(to_markdown(res))


if __name__ == "__main__":
    main()
