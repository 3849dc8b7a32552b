"""float32 against bfloat16 builds (``BuildSpec.precision``) at the two model sizes of
``featurize_sizes.py``, and where each one's featurizing time goes.

One thread, CPU-seconds, each contender a fresh process (``featurize_sizes._fresh``), the two
precisions interleaved over ``--rounds`` (order alternating), against the per-sample loop of the
same run; rows' fidelity against the loop's exact full-space scores. The phase profile wraps
the functions that do each phase (forward, the hooks' per-item weight-gradient formation,
projection, aggregation) with CPU-second timers in a fresh process per precision; the backward
to the layer inputs is the gradient call less those.

    python benchmarks/featurize_precision.py                 # both sizes, 2 rounds (~12 min)
    BENCH_MACHINE="idle 2-core EPYC" python benchmarks/featurize_precision.py --sizes cifar
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from featurize_sizes import SIZES, _build_worker, _fidelity, _fresh, _images, _loop_worker, _model
from timing import time_calls

HERE = Path(__file__).resolve().parent
PRECISIONS = ("float32", "bfloat16")
PROFILE = {"demo": (16, 10, 3), "cifar": (4, 2, 2)}  # images, timesteps, calls timed


def _profile_worker(size: str, precision: str) -> dict:
    """ms per draw of each featurizing phase (inclusive timers; see the module docstring)."""
    from diffusers import DDPMScheduler

    import gradindex as gi
    import gradindex.featurize.gradients as gr
    import gradindex.featurize.layer_grads as lg
    import gradindex.featurize.persample as ps
    import gradindex.featurize.projection as pr
    import gradindex.featurize.streamed as st
    import gradindex.featurize.taps as taps
    from gradindex.featurize.embedding import Embedder
    from gradindex.inputs.models import load_checkpoints

    torch.set_num_threads(1)
    spent: dict[str, float] = {}

    for owner, name, key in (
        (taps, "model_output", "forward"),
        (ps, "run_taps", "call"),
        (st, "run_taps", "call"),
        (taps.Tap, "backward", "hooks"),
        (lg, "write_layer_grads", "weight_grads"),
        (st, "write_layer_grads", "weight_grads"),
        (pr.SJLTProjector, "add_columns", "projection"),
        (pr.SJLTProjector, "project", "projection"),
        (gr, "accumulate", "aggregation"),
        (Embedder, "embed", "total"),
    ):
        time_calls(owner, name, key, spent)
    n, k, reps = PROFILE[size]
    ckpts = load_checkpoints([(_model(size), DDPMScheduler())], None, None, "none")
    spec = gi.BuildSpec(timesteps=k, num_train_timesteps=1000, precision=precision, batch_size=n)
    emb = Embedder(ckpts, spec)
    x0 = torch.from_numpy(_images(size, n)) * 2 - 1
    emb.embed(x0)  # warm: buffers, maps
    spent.clear()
    for _ in range(reps):
        emb.embed(x0)
    ms = {key: v / (reps * n * k) * 1000 for key, v in spent.items()}
    ms["backward_to_inputs"] = ms["call"] - ms["forward"] - ms["hooks"]
    ms["hooks_other"] = (
        ms["hooks"] - ms["weight_grads"] - ms.get("projection", 0.0) * (emb.path == "streamed")
    )
    return {"path": emb.path, "ms_per_draw": ms}


def run(sizes: list[str], rounds: int) -> dict:
    res: dict = {}
    for size in sizes:
        loop = _fresh(_loop_worker, size, 1)
        builds: dict[str, list] = {p: [] for p in PRECISIONS}
        profiles: dict[str, list] = {p: [] for p in PRECISIONS}
        for r in range(rounds):
            for p in PRECISIONS if r % 2 == 0 else PRECISIONS[::-1]:
                b = _fresh(_build_worker, size, 1, "auto", "sjlt", p)
                builds[p].append({**b, "load": os.getloadavg()[0]})
                profiles[p].append(_fresh(_profile_worker, size, p))
                print(f"{size} {p}: {b['cpu_s'] / b['draws'] * 1e3:.1f} ms/draw", flush=True)
        res[size] = _summary(size, loop, builds, profiles)
    return res


def _summary(size: str, loop: dict, builds: dict, profiles: dict) -> dict:
    rate = loop["draws"] / loop["cpu_s"]
    out: dict = {"loop_draws_per_cpu_s": rate, "loop_peak_rss_mb": loop["peak_rss_mb"]}
    for p, runs in builds.items():
        ms = [r["cpu_s"] / r["draws"] * 1e3 for r in runs]
        phases = {k: float(np.mean([pr["ms_per_draw"][k] for pr in profiles[p]])) for k in
                  profiles[p][0]["ms_per_draw"]}  # fmt: skip
        out[p] = {
            "ms_per_draw": ms,
            "x_loop": [1e3 / m / rate for m in ms],
            "peak_rss_mb": [r["peak_rss_mb"] for r in runs],
            "load": [r["load"] for r in runs],
            "path": runs[-1]["featurize"]["path"],
            "build_phases_cpu_s": runs[-1]["phases"],
            "featurize_ms_per_draw": phases,
            "fidelity_vs_exact": _fidelity(loop["exact"], runs[-1]["rows"], SIZES[size]["queries"]),
        }
    a, b = (np.asarray(builds[p][-1]["rows"]["tracin"]) for p in PRECISIONS)
    rel = np.linalg.norm(a - b, axis=1) / np.linalg.norm(a, axis=1)
    out["tracin_rows_rel_diff_median"] = float(np.median(rel))
    out["bf16_speedup"] = float(np.mean(out["float32"]["ms_per_draw"])) / float(
        np.mean(out["bfloat16"]["ms_per_draw"])
    )
    return out


PHASES = ("forward", "backward_to_inputs", "weight_grads", "projection", "aggregation", "total")


def markdown(res: dict) -> str:
    m = res["machine"]
    lines = [
        "# float32 against bfloat16 builds (`featurize_precision.py`)",
        "",
        f"Machine: {m['platform']}, {m['cpus']} CPUs, torch {m['torch']}, 1 thread; {m['note']}; "
        f"load average {m['load_average_at_start']:.1f} at start. CPU-seconds; each build a fresh "
        "process, the precisions interleaved; ratios against the loop of the same run.",
        "",
        "| size | path | loop draws/CPU-s | float32 ms/draw (× loop) | bfloat16 ms/draw (× loop) "
        "| bf16 / f32 speed | peak RSS MB f32 / bf16 | TracIn rows rel. diff |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for size in res["sizes"]:
        r = res[size]
        f, b = r["float32"], r["bfloat16"]
        cell = [f"{np.mean(x['ms_per_draw']):.1f} ({np.mean(x['x_loop']):.2f}×)" for x in (f, b)]
        lines.append(
            f"| {size} | {f['path']} | {r['loop_draws_per_cpu_s']:.2f} | {cell[0]} | {cell[1]} "
            f"| **{r['bf16_speedup']:.2f}×** | {max(f['peak_rss_mb']):.0f} / "
            f"{max(b['peak_rss_mb']):.0f} | {r['tracin_rows_rel_diff_median']:.4f} |"
        )
    lines += ["", "Rows against the loop's exact scores (query rows against the rest):", "",
              "| size | precision | method | Spearman | top-k |", "|---|---|---|---|---|"]  # fmt: skip
    for size in res["sizes"]:
        for p in PRECISIONS:
            for meth, v in res[size][p]["fidelity_vs_exact"].items():
                top = v[f"top{v['k']}"]
                lines.append(f"| {size} | {p} | {meth} | {v['spearman']:.3f} | {top:.2f} |")
    lines += ["", "Featurizing ms per draw by phase (float32 → bfloat16):", "",
              "| size | " + " | ".join(PHASES) + " |", "|---|" + "---|" * len(PHASES)]  # fmt: skip
    for size in res["sizes"]:
        f, b = (res[size][p]["featurize_ms_per_draw"] for p in PRECISIONS)
        cells = [f"{f.get(k, 0.0):.2f} → {b.get(k, 0.0):.2f}" for k in PHASES]
        lines.append(f"| {size} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", nargs="*", default=["demo", "cifar"], choices=list(SIZES))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args()
    machine = {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "note": os.environ.get("BENCH_MACHINE", "machine not described (set BENCH_MACHINE)"),
        "load_average_at_start": os.getloadavg()[0],
    }
    res = {"machine": machine, "sizes": args.sizes, **run(args.sizes, args.rounds)}
    res["load_average_at_end"] = os.getloadavg()[0]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "featurize_precision.json").write_text(json.dumps(res, indent=1))
    (args.out / "featurize_precision.md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
