"""The fidelity check's share of a small build, with and without featurizing its sample again.

A build measures its projection fidelity on S = 32 sampled rows (gradindex.featurize.fidelity).
At small N that sample is a large share of the rows, so featurizing it a second time was a
large share of the build. Four builds of the demo UNet on the digits, in one process, one
torch thread, interleaved over ``--repeats``:

- ``full, kept``: the default (sjlt) build, which keeps the sample's full-space features from
  its own featurizing (exact reference);
- ``full, again``: the same build featurizing its sample again for the exact reference (the
  behaviour before: ``hold_sample`` switched off) — the baseline of the first;
- ``kronecker, halves``: a Kronecker build whose exact scores do not fit (as at 35.7M
  parameters; ``FULL_SPACE_BUDGET`` = 0 here): the stored rows' halves;
- ``kronecker, second sketch``: the same featurizing a second Kronecker sketch of its sample
  (the behaviour before: halves switched off) — the baseline of the third.

Writes benchmarks/results/fidelity_share.json and .md: CPU-seconds of each build and of its
fidelity check, the check's share, and each build's CPU-seconds as a ratio of its baseline's.

    python benchmarks/bench_fidelity_share.py --rows 128 --repeats 1
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

import numpy as np
import torch
from timing import time_calls

import gradindex as gi
import gradindex.build.write as write
import gradindex.featurize.fidelity as fidelity
from gradindex.demo.training import load_digits_images, small_unet_config

RESULTS = Path(__file__).resolve().parent / "results"
MODES = ("full, kept", "full, again", "kronecker, halves", "kronecker, second sketch")
BASELINE = {"full, kept": "full, again", "kronecker, halves": "kronecker, second sketch"}


def _unet(seed: int = 0) -> tuple:
    """(the demo UNet, randomly initialised under ``seed``, its DDPM scheduler)."""
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(seed)
    model = UNet2DModel(**small_unet_config())
    with torch.no_grad():  # away from the init, as bench_featurize does
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model.eval(), DDPMScheduler(num_train_timesteps=1000)


def _build(mode: str, images: np.ndarray, sample: int) -> dict:
    """One build in ``mode``: its CPU-seconds, its fidelity check's, and the record."""
    saved = (write.hold_sample, write.measure_fidelity, fidelity.split_halves,
             fidelity.FULL_SPACE_BUDGET)  # fmt: skip
    spent: dict[str, float] = {}
    time_calls(write, "measure_fidelity", "fidelity", spent)
    if mode == "full, again":
        write.hold_sample = lambda *args: None
    if mode.startswith("kronecker"):
        fidelity.FULL_SPACE_BUDGET = 0
    if mode == "kronecker, second sketch":
        fidelity.split_halves = lambda embedder: None
    projection = "kronecker" if mode.startswith("kronecker") else "sjlt"
    try:
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # below-the-bar warnings of a random model
            start = time.process_time()
            idx = gi.build_index(
                checkpoints=[_unet()], data=images, out=Path(tmp) / "idx",
                spec=gi.BuildSpec(projection=projection), progress=False,
                fidelity_sample=sample,
            )  # fmt: skip
            total = time.process_time() - start
            record = idx.info()["fidelity"]
    finally:
        write.hold_sample, write.measure_fidelity, fidelity.split_halves = saved[:3]
        fidelity.FULL_SPACE_BUDGET = saved[3]
    return {
        "build_cpu_s": round(total, 2),
        "fidelity_cpu_s": round(spent["fidelity"], 2),
        "reference": record["reference"],
        "spearman": {m: round(record[m]["spearman"], 4) for m in ("tracin", "retrac")},
    }


def to_markdown(res: dict) -> str:
    m = res["machine"]
    lines = [
        "# The fidelity check's share of a small build",
        "",
        f"Machine: {m['platform']}, {m['cpus']} CPUs, torch {m['torch']}, 1 torch thread; load "
        f"average {m['load_average_at_start'][0]:.1f} at start. Demo UNet (619,697 parameters), "
        f"{res['rows']} digits, default spec but the projection, fidelity sample {res['sample']}, "
        f"one checkpoint; CPU-seconds, median of {res['repeats']} interleaved run(s).",
        "",
        "| build | reference | build CPU-s | fidelity CPU-s | share | vs baseline | Spearman "
        "TracIn / ReTrac |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode in MODES:
        r = res["modes"][mode]
        base = BASELINE.get(mode)
        ratio = f"{r['build_cpu_s'] / res['modes'][base]['build_cpu_s']:.2f}×" if base else "—"
        share = 100 * r["fidelity_cpu_s"] / r["build_cpu_s"]
        lines.append(
            f"| {mode} | {r['reference']} | {r['build_cpu_s']:.1f} | {r['fidelity_cpu_s']:.1f} | "
            f"{share:.1f}% | {ratio} | {r['spearman']['tracin']:.3f} / "
            f"{r['spearman']['retrac']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--sample", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(1)
    images = load_digits_images()[: args.rows]
    runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
    load = os.getloadavg()
    for mode in MODES:  # warm-up, not recorded: the first build pays the lazy set-ups
        _build(mode, images[:8], 4)
    for _ in range(args.repeats):
        for mode in MODES:  # interleaved: a slow spell of the machine hits every mode
            runs[mode].append(_build(mode, images, args.sample))
            print(mode, runs[mode][-1], flush=True)
    modes = {}
    for mode, rs in runs.items():
        mid = sorted(rs, key=lambda r: r["build_cpu_s"])[len(rs) // 2]
        modes[mode] = {**mid, "runs": rs}
    res = {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "load_average_at_start": load,
        },
        "rows": args.rows,
        "sample": args.sample,
        "repeats": args.repeats,
        "modes": modes,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "fidelity_share.json").write_text(json.dumps(res, indent=2) + "\n")
    (RESULTS / "fidelity_share.md").write_text(to_markdown(res))
    print(to_markdown(res))


if __name__ == "__main__":
    main()
