"""Where a warm demo build's featurizing time goes beyond the batched forward+backward, and the
same against an older tree of gradindex, interleaved (issue 29).

Each measurement is a fresh process (``--worker``) that imports gradindex from one tree: the demo
UNet (0.62M parameters, 16×16), the default spec (K = 10, sparse JL d = 4,096), 64 digits embedded
in batches of 16 after one warm batch. It reports draws per CPU-second (``time.process_time``,
all threads), the CPU-seconds per phase (per-item gradients; norms + TracIn/ReTrac aggregation;
sparse-JL projection; the rest), and the ceiling: one batched forward+backward of a summed loss
over 160 items (no per-sample gradients) in the same process. Trees alternate round by round, so
drift on a shared machine hits both alike.

    python benchmarks/featurize_overhead.py --baseline /path/to/old/tree --rounds 3

Writes ``benchmarks/results/featurize_overhead.json`` and ``featurize_overhead.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from timing import time_calls

HERE = Path(__file__).resolve().parent
IMAGES, BATCH = 64, 16


def worker(threads: int, profile: bool = False) -> dict:
    """One tree's figures in this process (gradindex imported from PYTHONPATH); ``profile``:
    also the torch profiler's top operators by self CPU time over the same embeds."""
    import torch

    torch.set_num_threads(threads)
    from diffusers import DDPMScheduler, UNet2DModel

    import gradindex as gi
    from gradindex.demo.training import load_digits_images, small_unet_config
    from gradindex.featurize import gradients, projection
    from gradindex.featurize.embedding import Embedder
    from gradindex.inputs.models import load_checkpoints

    torch.manual_seed(0)
    model = UNet2DModel(**small_unet_config()).eval()
    with torch.no_grad():  # away from the init, as bench_featurize does
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    ckpts = load_checkpoints([(model, DDPMScheduler(num_train_timesteps=1000))])
    spec = gi.BuildSpec(num_train_timesteps=1000)
    emb = Embedder(ckpts, spec)
    x0 = torch.from_numpy(load_digits_images(16)[:IMAGES]).float() * 2 - 1
    spent = {"gradients": 0.0, "featurize": 0.0, "project": 0.0}

    for owner, name, key in (
        (gradients.GradientFeaturizer, "_draw_rows", "gradients"),
        (gradients.GradientFeaturizer, "featurize", "featurize"),
        (projection.SJLTProjector, "project", "project"),
    ):
        time_calls(owner, name, key, spent)
    emb.embed(x0[:BATCH])  # warm: buffers touched, oneDNN primitives made
    spent.update(dict.fromkeys(spent, 0.0))
    start = time.process_time()
    for i in range(0, IMAGES, BATCH):
        emb.embed(x0[i : i + BATCH])
    total = time.process_time() - start
    draws = IMAGES * spec.num_draws

    gen = torch.Generator().manual_seed(0)
    x_t = torch.randn(160, 1, 16, 16, generator=gen)
    target = torch.randn(160, 1, 16, 16, generator=gen)
    t = torch.randint(0, 1000, (160,), generator=gen)
    params = list(model.parameters())

    def batched() -> None:
        out = model(x_t, t).sample
        torch.autograd.grad((out - target).pow(2).mean(), params)

    batched()
    start = time.process_time()
    for _ in range(4):
        batched()
    ceiling = 640 / (time.process_time() - start)
    phases = {
        "per-item gradients": spent["gradients"],
        "norms + aggregation": spent["featurize"] - spent["gradients"],
        "projection": spent["project"],
        "rest": total - spent["featurize"] - spent["project"],
    }
    res = {
        "draws_per_cpu_s": draws / total,
        "cpu_s": total,
        "phases_cpu_s": phases,
        "batched_items_per_cpu_s": ceiling,
    }
    if profile:
        res["top_ops"] = _top_ops(
            lambda: [emb.embed(x0[i : i + BATCH]) for i in range(0, IMAGES, BATCH)]
        )
    return res


def _top_ops(fn, count: int = 12) -> list[dict]:
    """The torch profiler's top operators of ``fn()`` by self CPU time, with their shares."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in ops)
    return [
        {"op": e.key, "share": e.self_cpu_time_total / total, "calls": e.count} for e in ops[:count]
    ]


def run_tree(tree: str, threads: int, profile: bool = False) -> dict:
    env = {**os.environ, "PYTHONPATH": tree, "OMP_NUM_THREADS": str(threads)}
    env["MKL_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, __file__, "--worker", "--threads", str(threads)]
    cmd += ["--profile"] if profile else []
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, cwd=tree)
    return json.loads(out.stdout.strip().splitlines()[-1])


def to_markdown(res: dict) -> str:
    lines = [
        "# Featurizing overhead on the demo UNet (issue 29)",
        "",
        f"Machine: {res['machine']}; load average {res['load_before']} before, "
        f"{res['load_after']} after. 64 digits, default spec, warm; CPU-seconds, medians of "
        f"{res['rounds']} interleaved rounds, each a fresh process.",
        "",
        "| tree | threads | draws / CPU-s (rounds) | × baseline | gradients | norms + "
        "aggregation | projection | rest | batched fwd+bwd items / CPU-s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in res["summary"]:
        ph = row["phases_cpu_s"]
        rounds = ", ".join(
            f"{r['draws_per_cpu_s']:.1f}" for r in res["runs"][f"{row['tree']} x{row['threads']}"]
        )
        lines.append(
            f"| {row['tree']} | {row['threads']} | {row['draws_per_cpu_s']:.1f} ({rounds}) | "
            f"{row['vs_baseline']:.3f} | {ph['per-item gradients']:.3f} | "
            f"{ph['norms + aggregation']:.3f} | {ph['projection']:.3f} | {ph['rest']:.3f} | "
            f"{row['batched_items_per_cpu_s']:.1f} |"
        )
    lines += [
        "",
        "Phases in CPU-seconds for the 640 draws. With more runnable threads than cores (load "
        "average above 2 on 2 cores) the two-thread figures measure contention, not the code.",
    ]
    if res.get("top_ops"):
        lines += [
            "",
            f"Top operators of this tree at one thread (torch profiler, self CPU time, "
            f"{IMAGES} digits):",
            "",
            "| operator | share | calls |",
            "|---|---|---|",
        ]
        lines += [f"| `{o['op']}` | {o['share']:.1%} | {o['calls']:,} |" for o in res["top_ops"]]
    return "\n".join(lines) + "\n"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _median(values: list[float]) -> float:
    values = sorted(values)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, nargs="*", default=[1, 2])
    parser.add_argument("--baseline", help="another gradindex source tree to compare with")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="add this tree's top operators")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.threads[0], args.profile)))
        return
    trees = {"this tree": str(HERE.parent)}
    if args.baseline:
        trees = {"baseline": str(Path(args.baseline).resolve()), **trees}
    load_before = os.getloadavg()[0]
    runs: dict[tuple[str, int], list[dict]] = {}
    for r in range(args.rounds):
        for threads in args.threads:
            for name, tree in trees.items():
                got = run_tree(tree, threads)
                runs.setdefault((name, threads), []).append(got)
                print(f"round {r} {name} x{threads}: {got['draws_per_cpu_s']:.1f}", flush=True)
    summary = []
    for (name, threads), rows in runs.items():
        med = {k: _median([r[k] for r in rows]) for k in ("draws_per_cpu_s", "cpu_s")}
        med["batched_items_per_cpu_s"] = _median([r["batched_items_per_cpu_s"] for r in rows])
        phases = {k: _median([r["phases_cpu_s"][k] for r in rows]) for k in rows[0]["phases_cpu_s"]}
        summary.append({"tree": name, "threads": threads, **med, "phases_cpu_s": phases})
    for row in summary:
        base = next(
            s for s in summary if s["threads"] == row["threads"] and s["tree"] == next(iter(trees))
        )
        row["vs_baseline"] = row["draws_per_cpu_s"] / base["draws_per_cpu_s"]
    res = {
        "machine": f"{_cpu_name()}, {os.cpu_count()} cores",
        "load_before": round(load_before, 1),
        "load_after": round(os.getloadavg()[0], 1),
        "rounds": args.rounds,
        "trees": trees,
        "runs": {f"{k[0]} x{k[1]}": v for k, v in runs.items()},
        "summary": summary,
        "top_ops": run_tree(str(HERE.parent), 1, True)["top_ops"] if args.profile else None,
    }
    out = HERE / "results" / "featurize_overhead"
    out.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    out.with_suffix(".md").write_text(to_markdown(res))
    print(to_markdown(res))


if __name__ == "__main__":
    main()
