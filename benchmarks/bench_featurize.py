"""Featurizing benchmark: gradindex's gradient paths against the per-sample autograd loop.

Every figure is measured in this run, on this machine, next to its baseline:

1. ``grads``: per-sample-per-draw gradients/s and the peak RSS of a fresh process for the demo
   UNet (0.62M parameters, 16×16) and a ~9× larger one (channels 48, 96, 192): (a) the plain
   per-sample ``torch.autograd.grad`` loop (the reference approach), (b) gradindex's hook path at
   several items per call, (c) the Kronecker path (per-layer factors, exact norms), and (d) the
   ceiling: one batched forward+backward of a summed loss (no per-sample gradients at all).
2. ``build``: a whole build (featurize, project, store, index) over training images with the
   default spec on the demo UNet, against the same build whose per-item gradients come from the
   loop (everything else identical, so the stored rows must agree: checked with allclose), plus
   the share of the build spent projecting, and the Kronecker build (norms must agree exactly).
3. ``projection``: vectors/s of each projector for p ∈ {10⁶, 10⁷}, d ∈ {1024, 4096}, with TRAK's
   CPU ``BasicProjector`` (``pip install --no-deps traker``) as an outside baseline if present.
4. ``lora``: a text-conditioned latent UNet with a rank-4 LoRA adapter: per-draw gradients/s
   and bytes over the adapter only against every UNet parameter.
5. ``memory``: peak RSS of builds over N = 1,000 and N = 10,000 images (tiny UNet): during
   featurizing + storing (streaming: should not grow with N) and overall (the FAISS indexes
   hold N·D floats per method by nature).
6. ``profile``: where a warm build's time goes: the embedding of 16-image batches with the
   default spec on the demo UNet, split into per-item gradients / norms + aggregation /
   projection by wall time, and the torch profiler's top operators by self CPU time.

7. ``sizes``: whole default builds and Kronecker builds against the loop at the demo size and at
   the 35.7M-parameter CIFAR-10 DDPM architecture, 1 and 2 threads, with where the time goes,
   the batched and FLOP ceilings and the rows' fidelity against exact scores
   (``featurize_sizes.py``).

Writes ``benchmarks/results/featurize.json`` and ``featurize.md``.

    python benchmarks/bench_featurize.py                      # everything (~15 min, 2 cores)
    python benchmarks/bench_featurize.py --sections build     # one section
    python benchmarks/bench_featurize.py --sections sizes     # both model sizes (~10 min idle)
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from featurize_sizes import section_sizes
from featurize_sizes_md import sizes_markdown
from timing import time_calls

from gradindex.demo.training import load_digits_images, small_unet_config

HERE = Path(__file__).resolve().parent
DEMO_UNET = small_unet_config()  # the demo's UNet: 619,697 parameters at 16×16
LARGE_UNET = small_unet_config(block_out_channels=(48, 96, 192))  # ~9× the parameters
TINY_UNET = small_unet_config(sample_size=8, block_out_channels=(8, 16), norm_num_groups=4)
MODELS = {"demo": DEMO_UNET, "large": LARGE_UNET}


# ---------------------------------------------------------------------------------------------
# helpers


def _unet(config: dict, seed: int = 0):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    model = UNet2DModel(**config)
    with torch.no_grad():  # away from the init so gradients look trained-ish, not symmetric
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model.eval()


def _batch(n: int, size: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x_t = torch.randn(n, 1, size, size, generator=gen)
    target = torch.randn(n, 1, size, size, generator=gen)
    t = torch.randint(0, 1000, (n,), generator=gen)
    return x_t, t, target


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _in_fresh_process(fn, *args):
    """Run fn(*args) in a spawned process (its own peak RSS); returns its result dict."""
    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(fn, args)


def _timed(fn, min_seconds: float, min_reps: int = 2) -> float:
    """Seconds per call: one warm-up, then repeat until both floors are met."""
    fn()
    reps, start = 0, time.perf_counter()
    while reps < min_reps or time.perf_counter() - start < min_seconds:
        fn()
        reps += 1
    return (time.perf_counter() - start) / reps


def loop_item_gradients(model, params, x_t, t, target, loss: str = "mse") -> torch.Tensor:
    """The reference approach: one forward, one torch.autograd.grad per item. → [I, p]"""
    from gradindex.featurize.losses import diffusion_loss
    from gradindex.inputs.models import model_output

    rows = []
    for i in range(len(x_t)):
        out = model_output(model, x_t[i : i + 1], t[i : i + 1])
        grads = torch.autograd.grad(diffusion_loss(out, target[i : i + 1], loss), params)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


def loop_draw_rows(self, x_t, t, target, flat, group, cond=None):
    """``GradientFeaturizer._draw_rows`` with the reference loop in place of the batched
    gradients; the rows then go through the same aggregation, projection and storage."""
    named = dict(self.model.named_parameters())
    params = [named[name].requires_grad_(True) for name in self.param_names]
    rows = loop_item_gradients(self.model, params, x_t, t, target)
    return [(0, flat[: rows.numel()].view_as(rows).copy_(rows))], None, None


# ---------------------------------------------------------------------------------------------
# 1. gradients/s per path


def _grads_worker(model_name: str, path: str, items: int, threads: int, seconds: float) -> dict:
    torch.set_num_threads(threads)
    from gradindex.featurize.kronecker import KroneckerGradients
    from gradindex.featurize.losses import item_losses
    from gradindex.featurize.persample import HookGradients

    config = MODELS[model_name]
    model = _unet(config)
    names = [n for n, _ in model.named_parameters()]
    params = list(model.parameters())
    x_t, t, target = _batch(items, config["sample_size"])

    def loss_fn(out, tgt):
        return item_losses(out, tgt, "mse")

    if path == "loop":
        fn = lambda: loop_item_gradients(model, params, x_t, t, target)  # noqa: E731
    elif path == "ceiling":

        def fn():
            out = model(x_t, t).sample
            torch.autograd.grad((out - target).pow(2).mean(), params)

    elif path == "hooks":
        hooks = HookGradients(model, names, loss_fn)
        buf = torch.empty(items * hooks.num_params)  # laid out per parameter, as builds do
        fn = lambda: hooks.item_gradient_blocks(x_t, t, target, flat=buf)  # noqa: E731
    elif path == "kronecker":
        kron = KroneckerGradients(model, names, loss_fn, out_dim=4096, seed=0)
        fn = lambda: kron.item_rows(x_t, t, target)  # noqa: E731
    else:
        raise ValueError(path)
    sec = _timed(fn, seconds)
    return {
        "model": model_name,
        "params": sum(p.numel() for p in params),
        "path": path,
        "items_per_call": items,
        "per_draw_grads_per_s": items / sec,
        "peak_rss_mb": _peak_rss_mb(),
    }


def section_grads(threads: int, seconds: float, models: list[str]) -> list[dict]:
    rows = []
    for name in models:
        plan = [("loop", 16 if name == "demo" else 8), ("ceiling", 64)]
        plan += [("hooks", n) for n in (16, 64, 128)] + [("kronecker", 64)]
        for path, items in plan:
            r = _in_fresh_process(_grads_worker, name, path, items, threads, seconds)
            print(f"  grads {name} {path} x{items}: {r['per_draw_grads_per_s']:.1f}/s", flush=True)
            rows.append(r)
        loop = next(
            r["per_draw_grads_per_s"] for r in rows if r["model"] == name and r["path"] == "loop"
        )
        for r in rows:
            if r["model"] == name:
                r["vs_loop"] = r["per_draw_grads_per_s"] / loop
    return rows


def _text_unet_with_lora():
    """A small text-conditioned latent UNet (4×16×16 latents, 32-wide text states) with a rank-4
    LoRA adapter on its attention projections, as diffusers' LoRA training script sets it up."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=8,
        attention_head_dim=8,
    )
    unet.add_adapter(
        LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                   target_modules=["to_k", "to_q", "to_v", "to_out.0"])
    )  # fmt: skip
    return unet.eval()


def _lora_worker(which: str, items: int, threads: int, seconds: float) -> dict:
    """Per-draw gradients/s over the LoRA adapter only, or over every UNet parameter."""
    torch.set_num_threads(threads)
    from gradindex.featurize.losses import item_losses
    from gradindex.featurize.persample import HookGradients

    unet = _text_unet_with_lora()
    names = [n for n, _ in unet.named_parameters() if which == "full" or "lora_" in n]
    for n, p in unet.named_parameters():
        p.requires_grad_(n in names)
    gen = torch.Generator().manual_seed(0)
    x_t = torch.randn(items, 4, 16, 16, generator=gen)
    target = torch.randn(items, 4, 16, 16, generator=gen)
    t = torch.randint(0, 1000, (items,), generator=gen)
    cond = {"encoder_hidden_states": torch.randn(items, 8, 32, generator=gen)}
    hooks = HookGradients(unet, names, lambda out, tgt: item_losses(out, tgt, "mse"))
    buf = torch.empty(items * hooks.num_params)
    sec = _timed(lambda: hooks.item_gradient_blocks(x_t, t, target, flat=buf, cond=cond), seconds)
    return {
        "params": "LoRA adapter only" if which == "lora" else "all UNet parameters",
        "num_params": hooks.num_params,
        "items_per_call": items,
        "per_draw_grads_per_s": items / sec,
        "gradient_bytes_per_draw": 4 * hooks.num_params,
        "peak_rss_mb": _peak_rss_mb(),
    }


def section_lora(threads: int, seconds: float) -> list[dict]:
    rows = [_in_fresh_process(_lora_worker, w, 32, threads, seconds) for w in ("full", "lora")]
    for r in rows:
        r["vs_full"] = r["per_draw_grads_per_s"] / rows[0]["per_draw_grads_per_s"]
        print(f"  lora {r['params']}: {r['per_draw_grads_per_s']:.1f}/s", flush=True)
    return rows


# ---------------------------------------------------------------------------------------------
# 2. whole builds


def _build_worker(mode: str, n: int, threads: int, out: str) -> dict:
    """One whole build with the default spec (or projection='kronecker'); mode 'loop' swaps the
    per-item gradients for the reference loop and leaves everything else as it is."""
    torch.set_num_threads(threads)
    from diffusers import DDPMScheduler

    import gradindex as gi
    from gradindex.featurize import projection
    from gradindex.featurize.gradients import GradientFeaturizer

    model = _unet(DEMO_UNET)
    images = load_digits_images(DEMO_UNET["sample_size"])[:n]
    spent = {"project": 0.0}
    original = projection.SJLTProjector.project

    def timed_project(self, x):
        start = time.perf_counter()
        try:
            return original(self, x)
        finally:
            spent["project"] += time.perf_counter() - start

    projection.SJLTProjector.project = timed_project
    if mode == "loop":
        GradientFeaturizer._draw_rows = loop_draw_rows
    spec = gi.BuildSpec(projection="kronecker") if mode == "kronecker" else gi.BuildSpec()
    start = time.perf_counter()
    idx = gi.build_index(
        checkpoints=[(model, DDPMScheduler(num_train_timesteps=1000))],
        data=images,
        out=out,
        spec=spec,
        index="flat",
        progress=False,
    )
    seconds = time.perf_counter() - start
    draws = n * idx.spec.num_timesteps * idx.spec.noise_draws
    np.savez(Path(out) / "rows.npz", tracin=idx.vectors("tracin"), retrac=idx.vectors("retrac"))
    return {
        "mode": mode,
        "n": n,
        "timesteps": idx.spec.num_timesteps,
        "projection": idx.spec.projection,
        "proj_dim": idx.spec.proj_dim,
        "seconds": seconds,
        "per_draw_grads_per_s": draws / seconds,
        "project_seconds": spent["project"],
        # Kronecker projects inside the gradient hooks: no separate projection step to time
        "project_share": None if mode == "kronecker" else spent["project"] / seconds,
        "peak_rss_mb": _peak_rss_mb(),
        "norms": idx.norms.tolist(),
    }


def section_build(threads: int, n: int, reps: int = 3) -> dict:
    """``reps`` rounds of (loop, default, kronecker) builds, each in a fresh process, interleaved
    so that a slow spell of the shared machine hits every mode alike; reports per-mode medians
    and the median of the per-round ratios to the loop."""
    rounds: list[dict[str, dict]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(reps):
            res = {}
            for mode in ("loop", "default", "kronecker"):
                out = os.path.join(tmp, f"{mode}-{rep}")
                r = _in_fresh_process(_build_worker, mode, n, threads, out)
                r["rows"] = dict(np.load(Path(out) / "rows.npz"))
                shutil.rmtree(out)
                print(f"  build {mode} #{rep}: {r['per_draw_grads_per_s']:.1f} draws/s", flush=True)
                res[mode] = r
            rounds.append(res)
    res = rounds[0]
    loop, default, kron = res["loop"], res["default"], res["kronecker"]
    summary: dict = {"n": n, "reps": reps, "timesteps": default["timesteps"], "modes": {}}
    for m in res:
        rates = [r[m]["per_draw_grads_per_s"] for r in rounds]
        entry = {k: v for k, v in res[m].items() if k not in ("rows", "norms")}
        entry["per_draw_grads_per_s"] = float(np.median(rates))
        entry["per_draw_grads_per_s_each"] = rates
        entry["seconds"] = float(np.median([r[m]["seconds"] for r in rounds]))
        entry["peak_rss_mb"] = float(np.median([r[m]["peak_rss_mb"] for r in rounds]))
        if m != "loop":
            ratios = [
                r[m]["per_draw_grads_per_s"] / r["loop"]["per_draw_grads_per_s"] for r in rounds
            ]
            entry["vs_loop"] = float(np.median(ratios))
            entry["vs_loop_each"] = ratios
        shares = [r[m]["project_share"] for r in rounds]
        entry["project_share"] = None if shares[0] is None else float(np.median(shares))
        summary["modes"][m] = entry
    summary["default_rows_match_loop"] = bool(
        all(
            np.allclose(default["rows"][k], loop["rows"][k], rtol=1e-3, atol=1e-5)
            for k in ("tracin", "retrac")
        )
    )
    summary["default_max_abs_diff"] = float(
        max(np.abs(default["rows"][k] - loop["rows"][k]).max() for k in ("tracin", "retrac"))
    )
    summary["kronecker_norms_match_loop"] = bool(
        np.allclose(np.array(kron["norms"]), np.array(loop["norms"]), rtol=1e-4)
    )
    return summary


# ---------------------------------------------------------------------------------------------
# 3. projection throughput


def section_projection(threads: int, batch: int = 16, limit_s: float = 60.0) -> list[dict]:
    from gradindex.featurize.projection import make_projector

    torch.set_num_threads(threads)
    try:
        from trak.projectors import BasicProjector, ProjectionType
    except ImportError:
        BasicProjector = None
    rows = []
    for p in (10**6, 10**7):
        x = torch.randn(batch, p)
        for d in (1024, 4096):
            kinds = ["sjlt", "gaussian"] + (["trak-basic"] if BasicProjector else [])
            for kind in kinds:
                cost = p * d  # dense kinds scale with p·d: skip what would run past the limit
                if kind != "sjlt" and cost > 1.1e9 * (limit_s / 10):
                    rows.append({"p": p, "d": d, "kind": kind, "skipped": f"p·d = {cost:.1e}"})
                    continue
                start = time.perf_counter()
                if kind == "trak-basic":
                    proj = BasicProjector(p, d, 0, ProjectionType.normal, torch.device("cpu"))
                    fn = lambda proj=proj, x=x: proj.project(x, model_id=0)  # noqa: E731
                else:
                    proj = make_projector(kind, p, d, 0, nnz=4)
                    fn = lambda proj=proj, x=x: proj.project(x)  # noqa: E731
                setup = time.perf_counter() - start
                start = time.perf_counter()
                fn()
                sec = time.perf_counter() - start
                if sec < 5:
                    sec = _timed(fn, 2.0, 1)
                rows.append(
                    {"p": p, "d": d, "kind": kind, "setup_s": setup, "vectors_per_s": batch / sec}
                )
                print(f"  project p={p:.0e} d={d} {kind}: {batch / sec:.2f} vec/s", flush=True)
        del x
    return rows


# ---------------------------------------------------------------------------------------------
# 4. memory against N


def _memory_worker(n: int, threads: int, out: str) -> dict:
    torch.set_num_threads(threads)
    from diffusers import DDPMScheduler

    import gradindex as gi
    from gradindex.build import pipeline as build_module

    model = _unet(TINY_UNET)
    rng = np.random.default_rng(0)
    images = rng.random((n, 1, 8, 8), dtype=np.float32)
    peaks = {"stream": 0.0, "all": 0.0}
    phase = {"name": "stream"}
    done = threading.Event()

    def sample():  # VmRSS every 20 ms, attributed to the current phase
        while not done.is_set():
            with open("/proc/self/status") as f:
                rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))
            peaks[phase["name"]] = max(peaks[phase["name"]], rss / 1024)
            done.wait(0.02)

    original = build_module.VectorStore.vectors

    def read_back(*args, **kwargs):  # the rows are read back to build the FAISS indexes
        phase["name"] = "all"
        return original(*args, **kwargs)

    build_module.VectorStore.vectors = read_back
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    gi.build_index(
        checkpoints=[(model, DDPMScheduler(num_train_timesteps=1000))],
        data=images,
        out=out,
        spec=gi.BuildSpec(timesteps=2, proj_dim=4096),
        index="flat",
        progress=False,
    )
    done.set()
    sampler.join()
    return {
        "n": n,
        "params": sum(p.numel() for p in model.parameters()),
        "peak_rss_stream_mb": peaks["stream"],
        "peak_rss_total_mb": max(peaks.values(), default=0.0),
        "index_vectors_mb": 2 * n * 4096 * 4 / 2**20,
    }


def section_memory(threads: int) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in (1000, 10000):
            r = _in_fresh_process(_memory_worker, n, threads, os.path.join(tmp, str(n)))
            print(f"  memory N={n}: stream {r['peak_rss_stream_mb']:.0f} MB", flush=True)
            rows.append(r)
    return rows


# ---------------------------------------------------------------------------------------------
# report


def _profile_worker(threads: int, batches: int) -> dict:
    """Warm 16-image embeds (default spec, demo UNet): stage shares by wall time, then the
    torch profiler's top operators by self CPU time over the same kind of batches."""
    torch.set_num_threads(threads)
    from diffusers import DDPMScheduler
    from torch.profiler import ProfilerActivity, profile

    import gradindex as gi
    from gradindex.featurize import gradients, projection
    from gradindex.featurize.embedding import Embedder
    from gradindex.inputs.models import load_checkpoints

    ckpts = load_checkpoints([(_unet(DEMO_UNET), DDPMScheduler(num_train_timesteps=1000))])
    spec = gi.BuildSpec(num_train_timesteps=ckpts[0].num_train_timesteps)
    emb = Embedder(ckpts, spec)
    images = load_digits_images(DEMO_UNET["sample_size"])[:16]
    x0 = torch.from_numpy(images).float() * 2 - 1  # the digits' [0, 1] → the model's [-1, 1]
    spent = {"gradients": 0.0, "featurize": 0.0, "project": 0.0}

    for owner, name, key in (
        (gradients.GradientFeaturizer, "_draw_rows", "gradients"),
        (gradients.GradientFeaturizer, "featurize", "featurize"),
        (projection.SJLTProjector, "project", "project"),
    ):
        time_calls(owner, name, key, spent, time.perf_counter)
    emb.embed(x0)  # warm: buffers touched, oneDNN primitives made
    for key in spent:
        spent[key] = 0.0
    start = time.perf_counter()
    for _ in range(batches):
        emb.embed(x0)
    total = time.perf_counter() - start
    stages = {
        "per-item gradients (forward, backward, per-item weight gradients)": spent["gradients"],
        "norms + TracIn/ReTrac aggregation": spent["featurize"] - spent["gradients"],
        "sparse JL projection": spent["project"],
        "other": total - spent["featurize"] - spent["project"],
    }
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(batches):
            emb.embed(x0)
    ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    op_total = sum(e.self_cpu_time_total for e in ops)
    return {
        "batches": batches,
        "images_per_batch": 16,
        "per_draw_grads_per_s": batches * 16 * spec.num_draws / total,
        "stages": {k: v / total for k, v in stages.items()},
        "top_ops": [
            {"op": e.key, "share": e.self_cpu_time_total / op_total, "calls": e.count}
            for e in ops[:10]
        ],
    }


def section_profile(threads: int, batches: int = 4) -> dict:
    return _in_fresh_process(_profile_worker, threads, batches)


def machine() -> dict:
    import faiss

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "faiss": faiss.__version__,
        "load_average_at_start": os.getloadavg(),
    }


def _share(share: float | None) -> str:
    return "in the hooks" if share is None else f"{100 * share:.1f}%"


def to_markdown(res: dict) -> str:
    m = res["machine"]
    lines = [
        "# Featurizing benchmark",
        "",
        f"Machine: {m['platform']}, {m['cpus']} CPUs, torch {m['torch']}, {res['threads']} torch "
        f"thread(s); load average {m['load_average_at_start'][0]:.1f} at start, "
        f"{res['load_average_at_end'][0]:.1f} at end. Every ratio is against a baseline measured "
        "in the same run.",
        "",
    ]
    for name, c in res.get("section_conditions", {}).items():
        lines.append(
            f"- section {name}: {c['threads']} torch thread(s), load average "
            f"{c['load_average_at_start']:.1f} when it started"
        )
    lines.append("")
    if "grads" in res:
        lines += [
            "## Per-sample-per-draw gradients/s",
            "",
            "| model | params | path | items/call | grads/s | × loop | peak RSS MB |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in res["grads"]:
            lines.append(
                f"| {r['model']} | {r['params']:,} | {r['path']} | {r['items_per_call']} | "
                f"{r['per_draw_grads_per_s']:.1f} | {r['vs_loop']:.2f} | {r['peak_rss_mb']:.0f} |"
            )
        lines.append("")
    if "build" in res:
        b = res["build"]
        lines += [
            f"## Whole build, demo UNet, {b['n']} digits × {b['timesteps']} timesteps "
            f"(median of {b.get('reps', 1)} interleaved rounds, each build in a fresh process)",
            "",
            "| build | projection | draws/s | × loop | seconds | projecting | peak RSS MB |",
            "|---|---|---|---|---|---|---|",
        ]
        for mode, r in b["modes"].items():
            each = ", ".join(f"{x:.2f}" for x in r.get("vs_loop_each", []))
            lines.append(
                f"| {mode} | {r['projection']} d={r['proj_dim']} | "
                f"{r['per_draw_grads_per_s']:.1f} | {r.get('vs_loop', 1.0):.2f}"
                f"{f' ({each})' if each else ''} | "
                f"{r['seconds']:.1f} | {_share(r['project_share'])} | {r['peak_rss_mb']:.0f} |"
            )
        lines += [
            "",
            f"Default build rows equal the loop build's: {b['default_rows_match_loop']} (max abs "
            f"difference {b['default_max_abs_diff']:.2e}); Kronecker norms equal the loop's: "
            f"{b['kronecker_norms_match_loop']}.",
            "",
        ]
    if "lora" in res:
        lines += [
            "## LoRA-only gradients (text-conditioned latent UNet, rank-4 adapter, hooks)",
            "",
            "| gradients over | parameters | grads/s | × full | gradient bytes per draw | "
            "peak RSS MB |",
            "|---|---|---|---|---|---|",
        ]
        for r in res["lora"]:
            lines.append(
                f"| {r['params']} | {r['num_params']:,} | {r['per_draw_grads_per_s']:.1f} | "
                f"{r['vs_full']:.2f} | {r['gradient_bytes_per_draw']:,} | {r['peak_rss_mb']:.0f} |"
            )
        lines.append("")
    if "projection" in res:
        lines += [
            "## Projection throughput (16 vectors per call)",
            "",
            "| p | d | projector | vectors/s | setup s |",
            "|---|---|---|---|---|",
        ]
        for r in res["projection"]:
            if "skipped" in r:
                lines.append(
                    f"| {r['p']:.0e} | {r['d']} | {r['kind']} | skipped ({r['skipped']}) | |"
                )
            else:
                lines.append(
                    f"| {r['p']:.0e} | {r['d']} | {r['kind']} | {r['vectors_per_s']:.2f} | "
                    f"{r['setup_s']:.1f} |"
                )
        lines.append("")
    if "memory" in res:
        lines += [
            "## Peak RSS against N (tiny UNet, 2 timesteps, d = 4096)",
            "",
            "| N | featurize + store MB | whole build MB | index vectors MB |",
            "|---|---|---|---|",
        ]
        for r in res["memory"]:
            lines.append(
                f"| {r['n']:,} | {r['peak_rss_stream_mb']:.0f} | {r['peak_rss_total_mb']:.0f} | "
                f"{r['index_vectors_mb']:.0f} |"
            )
        lines.append("")
    if "profile" in res:
        r = res["profile"]
        lines += [
            f"## Where a warm build's time goes ({r['batches']} batches of "
            f"{r['images_per_batch']} digits, default spec, demo UNet: "
            f"{r['per_draw_grads_per_s']:.1f} draws/s)",
            "",
            "| stage | share of wall time |",
            "|---|---|",
            *(f"| {k} | {v:.1%} |" for k, v in r["stages"].items()),
            "",
            "| operator (torch profiler) | share of self CPU time | calls |",
            "|---|---|---|",
            *(f"| `{o['op']}` | {o['share']:.1%} | {o['calls']:,} |" for o in r["top_ops"]),
            "",
        ]
    if "sizes" in res:
        lines += sizes_markdown(res["sizes"])
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--sections", nargs="*", default=["grads", "build", "projection", "memory", "profile"]
    )
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--seconds", type=float, default=3.0, help="timing floor per measurement")
    ap.add_argument("--build-n", type=int, default=128, help="training images in the build section")
    ap.add_argument("--build-reps", type=int, default=3, help="interleaved rounds of builds")
    ap.add_argument("--models", nargs="*", default=["demo", "large"])
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--sizes", nargs="*", default=["demo", "cifar"], help="sizes section: models")
    ap.add_argument("--size-threads", nargs="*", type=int, default=[1, 2])
    ap.add_argument("--size-rounds", type=int, default=1, help="sizes section: interleaved rounds")
    args = ap.parse_args()
    res: dict = {"machine": machine(), "threads": args.threads}
    path = args.out / "featurize.json"
    if path.exists():  # keep the sections not rerun
        old = json.loads(path.read_text())
        keep = (
            "grads", "build", "lora", "projection", "memory", "profile", "sizes",
            "section_conditions",
        )  # fmt: skip
        res.update({k: v for k, v in old.items() if k in keep})
    t0 = time.perf_counter()
    conditions = res.setdefault("section_conditions", {})  # kept sections keep their own
    for name in args.sections:
        conditions[name] = {"threads": args.threads, "load_average_at_start": os.getloadavg()[0]}
    if "grads" in args.sections:
        res["grads"] = section_grads(args.threads, args.seconds, args.models)
    if "build" in args.sections:
        res["build"] = section_build(args.threads, args.build_n, args.build_reps)
    if "lora" in args.sections:
        res["lora"] = section_lora(args.threads, args.seconds)
    if "projection" in args.sections:
        res["projection"] = section_projection(args.threads)
    if "memory" in args.sections:
        res["memory"] = section_memory(args.threads)
    if "profile" in args.sections:
        res["profile"] = section_profile(args.threads)
    if "sizes" in args.sections:
        new = section_sizes(args.size_threads, args.sizes, args.size_rounds)
        res["sizes"] = {**res.get("sizes", {}), **new}  # other sizes / thread counts kept
    res["seconds"] = time.perf_counter() - t0
    res["load_average_at_end"] = os.getloadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=2, sort_keys=True) + "\n")
    (args.out / "featurize.md").write_text(to_markdown(res))
    print(to_markdown(res))


if __name__ == "__main__":
    main()
