"""``bench_featurize.py --sections sizes``: whole builds against the per-sample loop at two model
sizes, each contender in its own process (its own peak RSS), interleaved, in CPU-seconds.

Sizes: the demo UNet (0.62M parameters, 16×16 grey) and the google/ddpm-cifar10-32 architecture
built from its config (35.7M parameters, 32×32 RGB, random weights: speed does not depend on
them). Contenders, per size and thread count:

- ``loop``: the reference approach, one forward and one ``torch.autograd.grad`` per draw, no
  projection; its process then computes exact full-space TracIn / ReTrac scores of a few query
  rows against all N (the fidelity reference; not timed).
- ``build``: ``build_index`` with the default spec (d = 4,096, batch 16, ``projection`` and
  ``precision`` 'auto': at the demo size sjlt over exact full-space gradients in float32, at
  35.7M Kronecker factors with projected norms, bfloat16 where the CPU has bfloat16 units) at K
  timesteps, its default featurize path and default fidelity check; the phases timed by
  wrapping the functions that do them: gradients (the featurizers, less projection and
  aggregation), projection, rows (aggregation into TracIn / ReTrac features), fidelity, and the
  rest (I/O: reading, storing, FAISS, manifest).
- ``build_full`` (demo size only: at 35.7M it takes ~12 GB): the full path forced.
- ``large_cfg`` (demo size only): what 'auto' picks for large models (kronecker-sjlt,
  projected norms, bfloat16), forced at the demo size.
- ``sjlt`` (35.7M only): the default before 'auto' (sjlt, exact norms, float32; the streamed
  path at this size).
- ``kron_f32`` (35.7M only): the default build in float32 (Kronecker, projected norms).
- ``ceiling``: one batched forward + backward of the summed loss at the build's items per call
  (no per-sample gradients at all), in float32 and under bfloat16 autocast; and the same
  backward to the inputs only (no weight gradient: all that Kronecker factors with projected
  norms need besides their small projections).

FLOP count: ``torch.utils.flop_counter`` of one draw (forward, backward to inputs and weights;
and without the weights) against the float32 matmul rate measured here: the FLOP ceilings in
draws per CPU-second.
"""

from __future__ import annotations

import multiprocessing as mp
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

CIFAR_UNET = {
    "sample_size": 32,
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": (128, 256, 256, 256),
    "layers_per_block": 2,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
}
# the contenders that build an index
BUILDS = ("build", "build_full", "large_cfg", "sjlt", "kron_f32")
# per size: training images N, timesteps K, query rows for the exact scores, images the loop
# is timed on (several CPU-seconds)
SIZES = {
    "demo": {"n": 128, "k": 10, "queries": 8, "timed": 32},
    "cifar": {"n": 24, "k": 2, "queries": 3, "timed": 8},
}


def _config(size: str) -> dict:
    from gradindex.demo.training import small_unet_config

    return small_unet_config() if size == "demo" else dict(CIFAR_UNET)


def _model(size: str):
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    model = UNet2DModel(**_config(size))
    with torch.no_grad():  # away from the init so gradients look trained-ish
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model.eval()


def _images(size: str, n: int) -> np.ndarray:
    cfg = _config(size)
    shape = (n, cfg.get("in_channels", 1), cfg["sample_size"], cfg["sample_size"])
    return np.random.default_rng(0).random(shape, dtype=np.float32)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _cpu() -> float:
    return time.process_time()


def _loop_worker(size: str, threads: int) -> dict:
    """Per-sample autograd loop over N·K draws (timed), then exact scores of the first queries."""
    from diffusers import DDPMScheduler

    import gradindex as gi
    from gradindex.featurize.losses import diffusion_loss

    torch.set_num_threads(threads)
    model, sched = _model(size), DDPMScheduler()
    cfg = SIZES[size]
    spec = gi.BuildSpec(timesteps=cfg["k"], num_train_timesteps=1000)
    draws = spec.draws(_images(size, 1).shape[1:])
    x0 = torch.from_numpy(_images(size, cfg["n"])) * 2 - 1
    params = list(model.parameters())

    def grads(x: torch.Tensor):
        for t, eps in draws:
            tt = torch.tensor([t])
            x_t = sched.add_noise(x[None], eps[None], tt)
            out = model(x_t, tt).sample
            yield torch.autograd.grad(diffusion_loss(out, eps[None], "mse"), params)

    timed = cfg["timed"]
    start = _cpu()
    for x in x0[:timed]:
        for _ in grads(x):
            pass
    seconds = _cpu() - start
    rss = _rss_mb()  # before the exact vectors below
    exact = _exact_scores(x0, cfg["queries"], grads)
    return {"draws": timed * len(draws), "cpu_s": seconds, "peak_rss_mb": rss, "exact": exact}


def _exact_scores(x0: torch.Tensor, queries: int, grads) -> dict:
    """Full-space TracIn ⟨a, a'⟩ and ReTrac cos(r, r') of the first ``queries`` rows against all
    rows, streaming: only the queries' vectors are kept."""

    def vectors(x):
        a = r = None
        for gs in grads(x):
            g = torch.cat([v.reshape(-1) for v in gs]).double()
            a = g.clone() if a is None else a.add_(g)
            u = g / g.norm()
            r = u if r is None else r.add_(u)
        return a, r / r.norm()

    qa, qr = zip(*(vectors(x) for x in x0[:queries]), strict=True)
    tracin = np.zeros((queries, len(x0)))
    retrac = np.zeros((queries, len(x0)))
    for j, x in enumerate(x0):
        a, r = (qa[j], qr[j]) if j < queries else vectors(x)
        tracin[:, j] = [float(q @ a) for q in qa]
        retrac[:, j] = [float(q @ r) for q in qr]
    return {"tracin": tracin.tolist(), "retrac": retrac.tolist()}


def _build_worker(
    size: str,
    threads: int,
    path: str,
    projection: str = "auto",
    precision: str = "auto",
    norms: str = "auto",
) -> dict:
    """One build over N images (the default spec but ``projection`` and ``precision``), its
    phases timed in CPU-seconds."""
    from diffusers import DDPMScheduler

    import gradindex as gi
    import gradindex.build.write as bw
    import gradindex.featurize.gradients as gr
    import gradindex.featurize.projection as pr

    torch.set_num_threads(threads)
    cfg = SIZES[size]
    phases = dict.fromkeys(("featurize", "projection", "rows", "fidelity"), 0.0)

    in_fidelity = [False]  # its own featurizing counts as fidelity only

    def timed(owner, name, key):
        fn = getattr(owner, name)

        def wrapper(*args, **kwargs):
            if in_fidelity[0]:
                return fn(*args, **kwargs)
            in_fidelity[0] = key == "fidelity"
            start = _cpu()
            try:
                return fn(*args, **kwargs)
            finally:
                phases[key] += _cpu() - start
                in_fidelity[0] = False

        setattr(owner, name, wrapper)

    timed(gr.GradientFeaturizer, "featurize", "featurize")
    timed(pr.SJLTProjector, "project", "projection")
    timed(pr.SJLTProjector, "add_columns", "projection")
    timed(gr, "accumulate", "rows")
    timed(bw, "measure_fidelity", "fidelity")
    setup = _cpu()
    out = Path(tempfile.mkdtemp()) / "idx"
    model = _model(size)
    images = _images(size, cfg["n"])
    start = _cpu()
    idx = gi.build_index(
        checkpoints=[(model, DDPMScheduler())],
        data=images,
        out=out,
        spec=gi.BuildSpec(
            timesteps=cfg["k"], projection=projection, precision=precision, norms=norms
        ),
        progress=False,
        featurize_path=path,
    )
    total = _cpu() - start
    rows = {m: idx.vectors(m).tolist() for m in ("tracin", "retrac")}
    record = idx.manifest.get("featurize")
    fidelity = idx.info()["fidelity"]
    shutil.rmtree(out.parent)
    inside = phases["projection"] if record and record["path"] != "full" else 0.0
    times = {
        "gradients": phases["featurize"] - phases["rows"] - inside,
        "projection": phases["projection"],
        "rows": phases["rows"],
        "fidelity": phases["fidelity"],
    }
    times["io_and_rest"] = total - sum(times.values())
    return {
        "draws": cfg["n"] * cfg["k"],
        "cpu_s": total,
        "setup_cpu_s": start - setup,
        "phases": times,
        "peak_rss_mb": _rss_mb(),
        "featurize": record,
        "spec": {k: getattr(idx.spec, k) for k in ("projection", "norms", "precision")},
        "fidelity": {k: fidelity.get(k) for k in ("reference", "tracin", "retrac", "ok")},
        "rows": rows,
    }


def _ceiling_worker(size: str, threads: int, items: int) -> dict:
    """Batched forward + backward of the summed loss (no per-sample gradients), and the FLOPs of
    one draw against this machine's float32 matmul rate."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.set_num_threads(threads)
    model = _model(size)
    x = torch.from_numpy(_images(size, items)) * 2 - 1
    t = torch.full((items,), 500)
    params = list(model.parameters())

    def step(n, dtype=None, weights=True):
        xs = x[:n].clone().requires_grad_(not weights)
        xs = xs + 0 if not weights else xs  # not a leaf: the FLOP counter's hooks refuse one
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            out = model(xs, t[:n]).sample
        torch.autograd.grad((out.float() - x[:n]).pow(2).mean(), params if weights else [xs])

    def rate(dtype=None, weights=True) -> float:
        step(items, dtype, weights)
        start = _cpu()
        step(items, dtype, weights)
        return items / (_cpu() - start)

    draws_per_cpu_s, bf16_per_cpu_s = rate(), rate(torch.bfloat16)
    inputs_per_cpu_s, inputs_bf16 = rate(weights=False), rate(torch.bfloat16, weights=False)
    with FlopCounterMode(display=False) as counter:
        step(1)
    with FlopCounterMode(display=False) as no_weights:
        step(1, weights=False)
    a = torch.randn(1024, 1024)
    a @ a
    start = _cpu()
    for _ in range(8):
        a @ a
    gflops = 8 * 2 * 1024**3 / (_cpu() - start) / 1e9
    flops = counter.get_total_flops()
    return {
        "items": items,
        "draws_per_cpu_s": draws_per_cpu_s,
        "bf16_draws_per_cpu_s": bf16_per_cpu_s,  # the same under bfloat16 autocast
        "inputs_draws_per_cpu_s": inputs_per_cpu_s,  # backward to the inputs only
        "inputs_bf16_draws_per_cpu_s": inputs_bf16,
        "flops_per_draw": flops,
        "flops_per_draw_no_weight_grads": no_weights.get_total_flops(),
        "matmul_gflops": gflops,
        "flop_ceiling_draws_per_cpu_s": gflops * 1e9 / flops,
        "flop_ceiling_no_weight_grads": gflops * 1e9 / no_weights.get_total_flops(),
        "peak_rss_mb": _rss_mb(),
    }


def _fresh(fn, *args) -> dict:
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


def _fidelity(exact: dict, rows: dict, queries: int) -> dict:
    """Stored-row scores of the query rows against the others vs the exact ones."""
    from gradindex.featurize.fidelity import agreement

    out = {}
    for m in ("tracin", "retrac"):
        x = np.asarray(rows[m], dtype=np.float64)
        served = x[:queries] @ x.T
        ex = np.asarray(exact[m])
        keep = [np.delete(np.arange(x.shape[0]), q) for q in range(queries)]
        e = np.stack([ex[q, keep[q]] for q in range(queries)])
        s = np.stack([served[q, keep[q]] for q in range(queries)])
        k = min(10, e.shape[1] // 2)
        got = agreement(e, s, (k,))
        out[m] = {"spearman": got["spearman"], f"top{k}": got[f"top{k}"], "k": k}
    return out


def section_sizes(threads_list: list[int], sizes: list[str], rounds: int = 1) -> dict:
    """Both sizes, each thread count, contenders interleaved over ``rounds``."""
    res: dict = {}
    for size in sizes:
        for threads in threads_list:
            runs: dict[str, list] = {n: [] for n in (*BUILDS, "loop", "ceiling")}
            for _ in range(rounds):
                runs["loop"].append(_fresh(_loop_worker, size, threads))
                runs["build"].append(_fresh(_build_worker, size, threads, "auto"))
                if size == "demo":
                    runs["build_full"].append(_fresh(_build_worker, size, threads, "full"))
                    large = ("auto", "kronecker-sjlt", "bfloat16", "projected")
                    runs["large_cfg"].append(_fresh(_build_worker, size, threads, *large))
                else:
                    sjlt = _fresh(_build_worker, size, threads, "auto", "sjlt", "float32")
                    runs["sjlt"].append(sjlt)
                    f32 = _fresh(_build_worker, size, threads, "auto", "auto", "float32")
                    runs["kron_f32"].append(f32)
                runs["ceiling"].append(_fresh(_ceiling_worker, size, threads, 16))
            res[f"{size}/{threads}"] = _summarise(size, runs)
            print(f"sizes {size} threads={threads}: done", flush=True)
    return res


def _summarise(size: str, runs: dict) -> dict:
    loop = float(np.median([r["draws"] / r["cpu_s"] for r in runs["loop"]]))
    out: dict = {"params": sum(p.numel() for p in _model(size).parameters())}
    out["loop"] = {
        "draws_per_cpu_s": loop,
        "peak_rss_mb": max(r["peak_rss_mb"] for r in runs["loop"]),
    }
    for name in BUILDS:
        if not runs[name]:
            continue
        rate = float(np.median([r["draws"] / r["cpu_s"] for r in runs[name]]))
        last = runs[name][-1]
        out[name] = {
            "draws_per_cpu_s": rate,
            "x_loop": rate / loop,
            "rounds_x_loop": [r["draws"] / r["cpu_s"] / loop for r in runs[name]],
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs[name]),
            "rss_x_loop": max(r["peak_rss_mb"] for r in runs[name]) / out["loop"]["peak_rss_mb"],
            "setup_cpu_s": last["setup_cpu_s"],
            "phases_cpu_s": last["phases"],
            "featurize": last["featurize"],
            "spec": last["spec"],
            "fidelity_record": last["fidelity"],
            "fidelity_vs_exact": _fidelity(
                runs["loop"][-1]["exact"], last["rows"], SIZES[size]["queries"]
            ),
        }
    c = runs["ceiling"][-1]
    out["ceiling"] = {**c, "x_loop": c["draws_per_cpu_s"] / loop}
    out["ceiling"]["bf16_x_loop"] = c["bf16_draws_per_cpu_s"] / loop
    out["ceiling"]["inputs_x_loop"] = c["inputs_draws_per_cpu_s"] / loop
    out["ceiling"]["inputs_bf16_x_loop"] = c["inputs_bf16_draws_per_cpu_s"] / loop
    out["flop_ceiling_x_loop"] = c["flop_ceiling_draws_per_cpu_s"] / loop
    out["flop_ceiling_no_weight_grads_x_loop"] = c["flop_ceiling_no_weight_grads"] / loop
    return out
