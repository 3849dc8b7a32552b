"""``bench_gpu.py --sections cifar``: issue 29's GPU item, the 35.7M-parameter CIFAR-10 DDPM
architecture (``featurize_sizes.CIFAR_UNET``, random weights) on one device, as one short run
that keeps whatever finishes.

Parts, in this order, each in its own try/except (a part that fails records why and the next
one runs); ``gpu_cifar.json`` and ``gpu_cifar.md`` are rewritten after every part:

1. ``loop``: the per-sample autograd loop on the device (one forward and one
   ``torch.autograd.grad`` per draw, float32, no projection): the baseline every × is against.
2. ``warmup``: a default build of one batch (CUDA context, cuDNN and autocast kernels, FAISS),
   so the timed builds are warm; its figures are kept but compare nothing.
3. ``auto_b16`` / ``auto_b64`` / ``auto_b128``: ``build_index`` with the default spec (projection
   and precision 'auto', recorded as resolved) at 16, 64 and 128 images per batch: draws/s of
   the whole build and of its featurizing, peak GPU memory, items per gradient call, seconds in
   the fidelity check.
4. ``auto_b128_mem``: the same at batch 128 with ``max_memory`` = ``BIG_MEMORY``: since session
   13 the automatic budget on CUDA is the device's free memory (before, the host's, capped at
   768 MiB of per-item work: ~15 items per call whatever the batch), so its items per call
   should match ``auto_b128``'s.
5. ``trak``: TRAK's ``CudaProjector`` (``traker`` and its ``fast_jl`` CUDA extension) on
   per-draw gradients from ``torch.func`` ``vmap(grad)`` (TRAK's functional gradient computer),
   and gradindex's sparse JL on the same gradients; where it cannot run, why.
6. ``cpu_auto``: the first images built on the CPU with ``auto_b16``'s resolved spec: relative
   error of the rows and norms against the device's.
7. ``sjlt_full_b16``: sjlt over full-space per-item gradients, float32, the full path forced
   (with ``max_memory`` = ``BIG_MEMORY``, as a user forcing the path would give it).
8. ``cpu_sjlt``: as ``cpu_auto``, against ``sjlt_full_b16`` (the CPU takes the path 'auto'
   picks: streamed at 35.7M; the same rows up to float32 rounding).

Budget: a part is skipped when less time is left of ``budget_s`` than the longest part so far
took; one that runs past the budget is stopped by an alarm (``guarded.run_parts``).
``--tiny`` runs the same parts on ``bench_featurize.TINY_UNET`` (seconds on a CPU; the test).
"""

from __future__ import annotations

import json
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from bench_featurize import TINY_UNET, _unet
from featurize_sizes import CIFAR_UNET
from gpu_cifar_md import BATCHES, BIG_MEMORY, cifar_markdown
from guarded import NotRun, run_parts

from gradindex.featurize.losses import diffusion_loss
from gradindex.inputs.models import Checkpoint, model_output

# per mode: the model, training images N, timesteps K, images the loop and TRAK time, and the
# images rebuilt on the CPU for the agreement parts
SETTINGS = {
    "cifar": {"config": CIFAR_UNET, "images": 256, "k": 2, "loop_images": 32, "agree_images": 8},
    "tiny": {"config": TINY_UNET, "images": 24, "k": 2, "loop_images": 4, "agree_images": 6},
}
TRAK_CHUNK = 32  # per-draw gradients per vmap call and CudaProjector call (its largest batch)


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _reset_peak(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _peak_mb(device: str) -> dict:
    """Peak GPU memory since ``_reset_peak`` ({} on a CPU)."""
    if torch.device(device).type != "cuda":
        return {}
    return {"gpu_peak_mb": torch.cuda.max_memory_allocated() / 2**20}


def _images(config: dict, n: int) -> np.ndarray:
    """n random images in [0, 1] of the model's input shape (speed does not depend on them)."""
    shape = (n, config.get("in_channels", 1), config["sample_size"], config["sample_size"])
    return np.random.default_rng(0).random(shape, dtype=np.float32)


def _featurizer(config: dict, k: int, device: str, backend: str = "vmap"):
    """A float32 ``GradientFeaturizer`` on a fresh model: its ``_items`` are the build's draws,
    its ``item_gradients`` (backend vmap) TRAK's per-draw gradients."""
    from diffusers import DDPMScheduler

    import gradindex as gi
    from gradindex.featurize.gradients import GradientFeaturizer

    ckpt = Checkpoint(_unet(config), DDPMScheduler(num_train_timesteps=1000), "memory:0", "-")
    spec = gi.BuildSpec(
        timesteps=k, projection="sjlt", precision="float32", num_train_timesteps=1000
    )
    return GradientFeaturizer(ckpt, spec, device, backend=backend)


def _draw_items(feat, images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every (image, timestep) draw of ``images`` as items x_t, t, target on the device."""
    x0 = torch.from_numpy(images).to(feat.device) * 2 - 1
    draws = feat.spec.draws(tuple(x0.shape[1:]))
    x_t, t, target, _ = feat._items(x0, draws, range(feat.spec.num_timesteps), None)
    return x_t, t, target


def part_loop(cfg: dict, device: str, images: np.ndarray) -> dict:
    """The reference approach on the device: per draw, one forward and one autograd.grad."""
    feat = _featurizer(cfg["config"], cfg["k"], device)
    x_t, t, target = _draw_items(feat, images[: cfg["loop_images"]])
    model, params = feat.model, list(feat.model.parameters())

    def grads(i: int) -> tuple[torch.Tensor, ...]:
        out = model_output(model, x_t[i : i + 1], t[i : i + 1])
        return torch.autograd.grad(diffusion_loss(out, target[i : i + 1], "mse"), params)

    grads(0)  # warm
    _reset_peak(device)
    start = time.perf_counter()
    for i in range(len(x_t)):
        grads(i)
    _sync(device)
    seconds = time.perf_counter() - start
    n = len(x_t)
    return {"draws": n, "seconds": seconds, "draws_per_s": n / seconds, **_peak_mb(device)}


@contextmanager
def _recorded(device: str) -> Iterator[dict]:
    """Seconds in featurizing (training rows, not the fidelity check's) and in the fidelity
    check, items per gradient call, and peak GPU memory, of the builds inside."""
    import gradindex.build.write as bw
    from gradindex.featurize.gradients import GradientFeaturizer
    from gradindex.featurize.kronecker import KroneckerFeaturizer
    from gradindex.featurize.streamed import StreamedFeaturizer

    rec: dict = {"featurize_s": 0.0, "fidelity_s": 0.0, "gradient_calls": 0, "items_per_call": []}
    inside = [False]

    def timed(fn: Callable, key: str) -> Callable:
        def wrapper(*args, **kwargs):
            if inside[0]:  # featurizing inside the fidelity check counts as the check
                return fn(*args, **kwargs)
            inside[0] = True
            _sync(device)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                _sync(device)
                rec[key] += time.perf_counter() - start
                inside[0] = False

        return wrapper

    def counted(fn: Callable) -> Callable:
        def wrapper(self, x_t, *args, **kwargs):
            rec["gradient_calls"] += 1
            if x_t.shape[0] not in rec["items_per_call"]:
                rec["items_per_call"].append(int(x_t.shape[0]))
            return fn(self, x_t, *args, **kwargs)

        return wrapper

    saved = [(GradientFeaturizer, "featurize"), (bw, "measure_fidelity")]
    saved += [(c, "_draw_rows") for c in (GradientFeaturizer, KroneckerFeaturizer)]
    saved += [(StreamedFeaturizer, "_draw_rows")]
    originals = [(owner, name, owner.__dict__[name]) for owner, name in saved]
    GradientFeaturizer.featurize = timed(GradientFeaturizer.featurize, "featurize_s")
    bw.measure_fidelity = timed(bw.measure_fidelity, "fidelity_s")
    for owner, _, fn in originals[2:]:
        owner._draw_rows = counted(fn)
    _reset_peak(device)
    try:
        yield rec
        rec.update(_peak_mb(device))
    finally:
        for owner, name, fn in originals:
            setattr(owner, name, fn)


def _build(cfg: dict, device: str, images: np.ndarray, spec, **kwargs) -> tuple[dict, dict]:
    """One timed build; its figures, and the rows / norms / resolved spec of its first
    ``agree_images`` images for the agreement parts."""
    from diffusers import DDPMScheduler

    import gradindex as gi

    model = _unet(cfg["config"])
    with tempfile.TemporaryDirectory() as tmp, _recorded(device) as rec, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*search stays on the CPU")
        _sync(device)
        start = time.perf_counter()
        idx = gi.build_index(
            checkpoints=[(model, DDPMScheduler(num_train_timesteps=1000))],
            data=images,
            out=f"{tmp}/idx",
            spec=spec,
            index="flat",
            device=device,
            progress=False,
            **kwargs,
        )
        _sync(device)
        seconds = time.perf_counter() - start
        n = cfg["agree_images"]
        kept = {m: idx.vectors(m)[:n].copy() for m in ("tracin", "retrac")}
        kept.update(norms=idx.norms[:n].copy(), spec=idx.spec)
        record = idx.manifest.get("featurize")
    draws = len(images) * idx.spec.num_draws
    res = {
        "images": len(images),
        "draws": draws,
        "seconds": seconds,
        "draws_per_s": draws / seconds,
        "featurize_draws_per_s": draws / rec["featurize_s"] if rec["featurize_s"] else None,
        "spec": {k: getattr(idx.spec, k) for k in ("projection", "norms", "precision")},
        "batch_size": idx.spec.batch_size,
        "featurize_record": record,
        **rec,
    }
    return res, kept


def _agreement(gpu: dict, cpu: dict) -> dict:
    """Relative error of the device's rows and norms against the CPU's, per method."""
    out = {}
    for m in ("tracin", "retrac"):
        x, y = cpu[m].astype(np.float64), gpu[m].astype(np.float64)
        rows = np.linalg.norm(x - y, axis=1) / np.linalg.norm(x, axis=1)
        out[m] = {
            "rel_error": float(np.linalg.norm(x - y) / np.linalg.norm(x)),
            "max_row_rel_error": float(rows.max()),
        }
    n1, n2 = cpu["norms"].astype(np.float64), gpu["norms"].astype(np.float64)
    out["norms_max_rel_error"] = float(np.abs(n1 - n2).max() / np.abs(n1).max())
    return out


def part_cpu(cfg: dict, images: np.ndarray, kept: dict, name: str) -> dict:
    """The first images rebuilt on the CPU with the resolved spec of part ``name``."""
    if name not in kept:
        raise RuntimeError(f"{name} did not finish: nothing to compare")
    n = cfg["agree_images"]
    res, cpu = _build(cfg, "cpu", images[:n], kept[name]["spec"], fidelity_sample=0)
    return {
        "against": name,
        "cpu_seconds": res["seconds"],
        "cpu_featurize_record": res["featurize_record"],
        **_agreement(kept[name], cpu),
    }


def trak_projector(p: int, d: int, device: str):
    """TRAK's ``CudaProjector`` (rademacher, seed 0); raises with the reason where it cannot
    be made (no ``traker``, no ``fast_jl``, not a CUDA device)."""
    from trak.projectors import CudaProjector, ProjectionType

    return CudaProjector(
        grad_dim=p,
        proj_dim=d,
        seed=0,
        proj_type=ProjectionType.rademacher,
        device=device,
        max_batch_size=TRAK_CHUNK,
    )


def functional_rows(
    feat, items: tuple[torch.Tensor, ...], project: Callable[[torch.Tensor], torch.Tensor]
) -> tuple[torch.Tensor, float]:
    """Per-draw gradients by ``vmap(grad)`` in chunks of ``TRAK_CHUNK`` draws (TRAK's functional
    gradient computer), each chunk's [I, p] projected by ``project``: the rows [I, d] and the
    seconds spent projecting."""
    x_t, t, target = items
    rows, projecting = [], 0.0
    for i in range(0, len(x_t), TRAK_CHUNK):
        flat = feat.item_gradients(*(v[i : i + TRAK_CHUNK] for v in (x_t, t, target)))
        _sync(str(feat.device))
        start = time.perf_counter()
        rows.append(project(flat))
        _sync(str(feat.device))
        projecting += time.perf_counter() - start
        del flat
    return torch.cat(rows), projecting


def part_trak(cfg: dict, device: str, images: np.ndarray, d: int = 4096) -> dict:
    """TRAK's CUDA projector on vmap per-draw gradients, and gradindex's sparse JL on the same
    gradients (projection seconds side by side)."""
    from gradindex.featurize.projection import make_projector

    feat = _featurizer(cfg["config"], cfg["k"], device)
    try:
        projector = trak_projector(feat.num_params, d, device)
    except (ImportError, ValueError) as exc:  # no traker / fast_jl, or not CUDA
        raise NotRun(f"TRAK's CudaProjector: {type(exc).__name__}: {exc}") from None
    items = _draw_items(feat, images[: cfg["loop_images"]])
    functional_rows(feat, tuple(v[:2] for v in items), lambda g: projector.project(g, 0))
    _reset_peak(device)
    start = time.perf_counter()
    _, trak_proj_s = functional_rows(feat, items, lambda g: projector.project(g, model_id=0))
    _sync(device)
    seconds = time.perf_counter() - start
    peak = _peak_mb(device)
    sjlt = make_projector("sjlt", feat.num_params, d, 0, nnz=4, device=feat.device)
    _, sjlt_proj_s = functional_rows(feat, items, sjlt.project)
    n = len(items[0])
    return {
        "draws": n,
        "seconds": seconds,
        "draws_per_s": n / seconds,
        "gradients": "torch.func vmap(grad), float32",
        "trak_projection_vectors_per_s": n / trak_proj_s,
        "sjlt_projection_vectors_per_s": n / sjlt_proj_s,
        **peak,
    }


def _plan(cfg: dict, device: str, images: np.ndarray, kept: dict) -> list[tuple[str, Callable]]:
    """(name, part) in ``PARTS`` order; a build part keeps its rows in ``kept``."""
    import gradindex as gi

    k = cfg["k"]

    def build(name: str, n: int, spec, **kwargs) -> Callable[[], dict]:
        def run() -> dict:
            res, kept[name] = _build(cfg, device, images[:n], spec, **kwargs)
            return res

        return run

    default = {b: gi.BuildSpec(timesteps=k, batch_size=b) for b in BATCHES}
    sjlt = gi.BuildSpec(timesteps=k, batch_size=16, projection="sjlt", precision="float32")
    full = {"featurize_path": "full", "max_memory": BIG_MEMORY}
    plan = [
        ("loop", lambda: part_loop(cfg, device, images)),
        ("warmup", build("warmup", 16, default[16])),
        *((f"auto_b{b}", build(f"auto_b{b}", len(images), default[b])) for b in BATCHES),
        ("auto_b128_mem", build("auto_b128_mem", len(images), default[128], max_memory=BIG_MEMORY)),
        ("trak", lambda: part_trak(cfg, device, images)),
        ("cpu_auto", lambda: part_cpu(cfg, images, kept, "auto_b16")),
        ("sjlt_full_b16", build("sjlt_full_b16", len(images), sjlt, **full)),
        ("cpu_sjlt", lambda: part_cpu(cfg, images, kept, "sjlt_full_b16")),
    ]
    return plan


def section_cifar(device: str, tiny: bool, budget_s: float, out: Path, machine: dict) -> dict:
    """Every part on ``device``; writes ``gpu_cifar[_tiny].json`` / ``.md`` to ``out`` after
    each part and returns the results."""
    mode = "tiny" if tiny else "cifar"
    cfg = SETTINGS[mode]
    params = sum(p.numel() for p in _unet(cfg["config"]).parameters())
    res: dict = {
        "machine": machine,
        "device": device,
        "mode": mode,
        "params": params,
        "settings": {k: v for k, v in cfg.items() if k != "config"},
        "budget_s": budget_s,
        "tf32": {
            "cudnn": torch.backends.cudnn.allow_tf32,
            "matmul": torch.backends.cuda.matmul.allow_tf32,
        },
    }
    stem = "gpu_cifar_tiny" if tiny else "gpu_cifar"
    out.mkdir(parents=True, exist_ok=True)

    def write(parts: dict) -> None:
        res["parts"] = parts
        (out / f"{stem}.json").write_text(json.dumps(res, indent=2, default=str) + "\n")
        (out / f"{stem}.md").write_text(cifar_markdown(res))

    images = _images(cfg["config"], cfg["images"])
    kept: dict[str, dict] = {}
    run_parts(_plan(cfg, device, images, kept), budget_s, write)
    return res
