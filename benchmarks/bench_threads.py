"""Thread-defaults benchmark: the demo's training and build throughput, idle and beside a CPU load,
with the old OpenMP defaults ("before") and gradindex's current ones ("after").

Each measurement runs in a fresh process, started the way a newcomer's ``gradindex demo`` starts
(no OMP_* variables of the caller's: they are removed from the child's environment):

- before: the old defaults, reproduced explicitly: torch is imported before gradindex, so
  libgomp loads with its own default wait policy (spin GOMP_SPINCOUNT=300000 times at every
  barrier, then sleep), and torch runs on every usable core;
- after: gradindex is imported first, as the console script does, so its defaults
  (``gradindex.inputs.threads``: GOMP_SPINCOUNT=1000, a cgroup quota respected) are in place
  before torch loads libgomp; torch keeps its own default thread count.

Tasks: ``train``: optimizer steps/s of the demo trainer (``gradindex.demo.training._fit``: the demo
UNet, 16×16 digits, batch 32), after one warm-up step, until ``--train-steps`` steps or
``--train-seconds`` have passed; ``build``: per-draw gradients/s of a whole build
(``build_index``, the demo's spec: K = 6 timesteps, one checkpoint, flat index) over
``--build-n`` digits. Loads: ``idle`` and ``loaded`` (2 extra processes spinning in pure Python
for as long as the measurement runs, killed after it). libgomp's own report of its settings
(``OMP_DISPLAY_ENV=VERBOSE``) is recorded for every child, so each row says what it ran with.

Writes ``benchmarks/results/threads.json`` and ``threads.md`` (``--quick``: a small functional
check into ``threads_quick.*``; its figures are not a measurement).

    python benchmarks/bench_threads.py            # ~6-7 min on 2 idle cores (3 rounds)
    python benchmarks/bench_threads.py --quick    # ~1-2 min
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CONDITIONS = ("before", "after")
LOADS = ("idle", "loaded")
BUSY_PROCESSES = 2
SPIN = "import sys, time\nend = time.time() + float(sys.argv[1])\nwhile time.time() < end:\n  pass"
# the caller's settings a newcomer would not have: removed from every child's environment
CLEARED = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


# ---------------------------------------------------------------------------------------------
# children (fresh processes)


def child_imports(condition: str):
    """Import in the order of the condition; returns torch."""
    if condition == "before":
        import torch  # libgomp loads with its own defaults

        import gradindex  # noqa: F401

        torch.set_num_threads(len(os.sched_getaffinity(0)))  # the old FAISS setting leaked here
        return torch
    importlib.import_module("gradindex")  # first: sets the OpenMP defaults, as the CLI does
    return importlib.import_module("torch")


def child_train(condition: str, steps: int, seconds: float) -> dict:
    """Prints ``START t`` after one warm-up step and ``STEP t`` after each timed step
    (``time.monotonic``, one clock for every process), so a child killed at its timeout still
    tells how far it got."""
    torch = child_imports(condition)
    from diffusers import DDPMScheduler, UNet2DModel

    from gradindex.demo.training import _fit, load_digits_images, small_unet_config

    torch.manual_seed(0)
    unet = UNet2DModel(**small_unet_config())  # the demo's UNet, 16×16
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    data = torch.from_numpy(load_digits_images(16)[:512]) * 2.0 - 1.0  # [N, 1, 16, 16]
    _fit(unet, scheduler, data, [1e-3], 32, 0, {}, False)  # warm-up
    start = time.monotonic()
    print(f"START {start}", flush=True)
    done = 0
    while done < steps and time.monotonic() - start < seconds:
        _fit(unet, scheduler, data, [1e-3], 32, done + 1, {}, False)
        done += 1
        print(f"STEP {time.monotonic()}", flush=True)
    return {"unit": "steps/s"}  # the parent reads the rate from the lines above


def child_build(condition: str, n: int, out: str) -> dict:
    torch = child_imports(condition)
    from diffusers import DDPMScheduler, UNet2DModel

    import gradindex as gi
    from gradindex.demo.run import DemoSettings
    from gradindex.demo.training import load_digits_images, small_unet_config

    torch.manual_seed(0)
    model = UNet2DModel(**small_unet_config()).eval()
    images = load_digits_images(16)[:n]
    spec = DemoSettings().spec
    start = time.perf_counter()
    idx = gi.build_index(
        checkpoints=[(model, DDPMScheduler(num_train_timesteps=1000))],
        data=images,
        out=out,
        spec=spec,
        index="flat",
        progress=False,
    )
    elapsed = time.perf_counter() - start
    draws = n * idx.spec.num_timesteps * idx.spec.noise_draws
    return {"draws": draws, "seconds": elapsed, "rate": draws / elapsed, "unit": "draws/s"}


def child_main(argv: list[str]) -> None:
    task, condition = argv[0], argv[1]
    if task == "train":
        res = child_train(condition, int(argv[2]), float(argv[3]))
    else:
        res = child_build(condition, int(argv[2]), argv[3])
    import torch

    res["torch_threads"] = torch.get_num_threads()
    print("RESULT " + json.dumps(res), flush=True)


# ---------------------------------------------------------------------------------------------
# parent


def openmp_report(text: str) -> dict:
    """GOMP_SPINCOUNT, OMP_WAIT_POLICY and OMP_NUM_THREADS from libgomp's OMP_DISPLAY_ENV, of
    the first runtime loaded (torch's: FAISS's own copy, loaded later, is not the one used)."""
    keys = ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY", "OMP_NUM_THREADS")
    first = text.split("OPENMP DISPLAY ENVIRONMENT END")[0]
    found = dict(re.findall(r"^\s*(\w+) = '([^']*)'", first, flags=re.M))
    return {k: found.get(k) for k in keys}


def train_rate(stdout: str, ended: float) -> dict:
    """Steps/s from a training child's START / STEP lines; an upper bound when no step ended."""
    start = [float(x) for x in re.findall(r"^START (\S+)$", stdout, flags=re.M)]
    marks = [float(x) for x in re.findall(r"^STEP (\S+)$", stdout, flags=re.M)]
    if not start:
        return {"rate": None}
    if not marks:
        return {"rate": None, "upper_bound": 1 / (ended - start[0]), "steps": 0}
    seconds = marks[-1] - start[0]
    return {"rate": len(marks) / seconds, "steps": len(marks), "seconds": seconds}


def run_child(args: list[str], timeout: float) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in CLEARED}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_DISPLAY_ENV"] = "VERBOSE"
    cmd = [sys.executable, __file__, "--child", *args]
    try:
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        stdout, stderr, error = out.stdout, out.stderr, None
        if out.returncode:
            error = (out.stderr.strip().splitlines() or ["?"])[-1]
    except subprocess.TimeoutExpired as e:
        stdout, stderr = _text(e.stdout), _text(e.stderr)
        error = f"killed at its {timeout:.0f} s timeout"
    res: dict = {"rate": None, "unit": "steps/s" if args[0] == "train" else "draws/s"}
    lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
    if lines:
        res.update(json.loads(lines[-1][len("RESULT ") :]))
    if args[0] == "train":
        res.update(train_rate(stdout, time.monotonic()))
    if error and res["rate"] is None:
        res["error"] = error
    res["openmp"] = openmp_report(stdout + stderr)
    return res


def _text(b: bytes | str | None) -> str:
    return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")


class BusyLoad:
    """``BUSY_PROCESSES`` pure-Python spin loops, bounded in time, killed on exit."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.procs = seconds, []

    def __enter__(self) -> BusyLoad:
        self.procs = [
            subprocess.Popen([sys.executable, "-c", SPIN, str(self.seconds)])
            for _ in range(BUSY_PROCESSES)
        ]
        time.sleep(0.5)
        return self

    def __exit__(self, *exc) -> None:
        for p in self.procs:
            p.kill()
        for p in self.procs:
            p.wait()


def measure(task: str, condition: str, load: str, a: argparse.Namespace, tmp: str) -> dict:
    if task == "train":
        args = ["train", condition, str(a.train_steps), str(a.train_seconds)]
        timeout = a.train_seconds + a.start_timeout
    else:
        out = os.path.join(tempfile.mkdtemp(dir=tmp), "index")  # a new folder every round
        args = ["build", condition, str(a.build_n), out]
        timeout = a.build_timeout
    load0 = os.getloadavg()[0]
    if load == "loaded":
        with BusyLoad(timeout + 10):
            res = run_child(args, timeout)
    else:
        res = run_child(args, timeout)
    res["load_average_at_start"] = load0
    print(f"  {task:5s} {condition:6s} {load:6s}: {rate_text(res)}", flush=True)
    return res


def rate_text(r: dict) -> str:
    if r["rate"] is not None:
        return f"{r['rate']:.2f} {r['unit']}"
    if "upper_bound" in r:
        return f"< {r['upper_bound']:.3f} {r['unit']} (no step finished)"
    return r.get("error", "no result")


def machine() -> dict:
    import faiss
    import torch

    from gradindex.inputs.threads import available_cpus

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "available_cpus": available_cpus(),
        "torch": torch.__version__,
        "faiss": faiss.__version__,
        "python": platform.python_version(),
    }


def median_round(rows: list[dict]) -> dict:
    """The round with the median rate (the upper one of two), with every round's rate kept."""
    done = sorted((r for r in rows if r["rate"] is not None), key=lambda r: r["rate"])
    pick = done[len(done) // 2] if done else rows[0]
    return {**pick, "round_rates": [r["rate"] for r in rows]}


def ratios(res: dict) -> None:
    """Each row's rate against the 'before' row of the same task and load (same run); where
    'before' finished no step, its upper bound gives a lower bound on the ratio."""
    for rows in res["tasks"].values():
        for load in LOADS:
            base = rows[f"before/{load}"]
            for cond in CONDITIONS:
                r = rows[f"{cond}/{load}"]
                if r["rate"] is not None and base["rate"]:
                    r["vs_before"] = r["rate"] / base["rate"]
                elif r["rate"] is not None and base.get("upper_bound"):
                    r["vs_before_at_least"] = r["rate"] / base["upper_bound"]


def to_markdown(res: dict) -> str:
    m = res["machine"]
    quick = res["settings"]["quick"]
    lines = [
        "# Thread defaults: demo training and build, idle and under load, before and after",
        "",
    ]
    if quick:
        lines += [
            "**Quick functional check (`--quick`): tiny sizes, figures are not a measurement.**",
            "",
        ]
    lines += [
        f"Machine: {m['processor']}, {m['cpu_count']} CPUs ({m['available_cpus']} available to "
        f"this process), {m['platform']}; torch {m['torch']}, faiss {m['faiss']}. Load average "
        f"{res['load_average_at_start']:.1f} at start, {res['load_average_at_end']:.1f} at end. "
        f"Every child is a fresh process without the caller's OMP_* variables; 'loaded' runs "
        f"{BUSY_PROCESSES} extra processes spinning in pure Python beside it. Ratios are against "
        "'before' under the same load, in the same run.",
        "",
        "- before: torch imported first (libgomp's own default wait policy: spin, then sleep), "
        "torch threads = all usable cores (the old FAISS setting leaked into torch);",
        "- after: gradindex imported first, as the console script does (GOMP_SPINCOUNT=1000 "
        "unless the user set it), torch's own default thread count.",
        "",
        "libgomp spin count: as libgomp itself reports it (OMP_DISPLAY_ENV): 300000 is its "
        "default (spin ~3 ms at every barrier before sleeping), 1000 gradindex's.",
        "",
        "| task | defaults | load | throughput (median) | rounds | × before | torch threads "
        "| libgomp spin count |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for task, rows in res["tasks"].items():
        for load in LOADS:
            for cond in CONDITIONS:
                r = rows[f"{cond}/{load}"]
                omp = r.get("openmp", {})
                vs = f"{r['vs_before']:.2f}" if "vs_before" in r else ""
                if "vs_before_at_least" in r:
                    vs = f"> {r['vs_before_at_least']:.1f}"
                rate = rate_text(r)
                rounds = ", ".join("-" if x is None else f"{x:.2f}" for x in r["round_rates"])
                lines.append(
                    f"| {task} | {cond} | {load} | {rate} | {rounds} | {vs} "
                    f"| {r.get('torch_threads', '')} | {omp.get('GOMP_SPINCOUNT', '')} |"
                )
    s = res["settings"]
    lines += [
        "",
        f"train: up to {s['train_steps']} steps or {s['train_seconds']:.0f} s after one warm-up "
        f"step (demo UNet, 16×16, batch 32). build: {s['build_n']} digits × the demo spec, one "
        f"checkpoint, flat index. Total benchmark time {res['seconds']:.0f} s.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child_main(sys.argv[2:])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a functional check only")
    ap.add_argument("--train-steps", type=int, default=None, help="default 30 (quick: 4)")
    ap.add_argument("--train-seconds", type=float, default=None, help="default 40 (quick: 8)")
    ap.add_argument("--build-n", type=int, default=None, help="default 48 digits (quick: 8)")
    ap.add_argument("--build-timeout", type=float, default=None, help="default 150 s (quick: 90)")
    ap.add_argument(
        "--start-timeout", type=float, default=90.0, help="s for a training child's set-up"
    )
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is kept")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    a = ap.parse_args()
    a.train_steps = a.train_steps or (4 if a.quick else 30)
    a.train_seconds = a.train_seconds or (8.0 if a.quick else 40.0)
    a.build_timeout = a.build_timeout or (90.0 if a.quick else 150.0)
    a.build_n = a.build_n or (8 if a.quick else 48)
    res: dict = {
        "machine": machine(),
        "settings": {
            "quick": a.quick,
            "train_steps": a.train_steps,
            "train_seconds": a.train_seconds,
            "build_n": a.build_n,
            "busy_processes": BUSY_PROCESSES,
            "rounds": a.rounds,
        },
        "load_average_at_start": os.getloadavg()[0],
        "tasks": {"train": {}, "build": {}},
    }
    t0 = time.perf_counter()
    runs: dict[tuple[str, str], list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(a.rounds):  # interleaved, so a drift in machine speed hits every row
            for load in LOADS:
                for task in ("train", "build"):
                    for cond in CONDITIONS:
                        row = measure(task, cond, load, a, tmp)
                        runs.setdefault((task, f"{cond}/{load}"), []).append(row)
    for (task, key), rows in runs.items():
        res["tasks"][task][key] = median_round(rows)
    ratios(res)
    res["seconds"] = time.perf_counter() - t0
    res["load_average_at_end"] = os.getloadavg()[0]
    name = "threads_quick" if a.quick else "threads"
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"{name}.json").write_text(json.dumps(res, indent=2, sort_keys=True) + "\n")
    (a.out / f"{name}.md").write_text(to_markdown(res))
    print(to_markdown(res))


if __name__ == "__main__":
    main()
