"""Peak RSS of a whole ``gradindex build`` of the 35.7M-parameter CIFAR-10 DDPM architecture
against a bare per-sample autograd loop, each in a child process measured from outside:
``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss`` after ``subprocess.run``, one child per
wrapper process (the maximum is over all children a process waited for).

    python benchmarks/peak_rss_sizes.py                       # loop and this tree's build
    python benchmarks/peak_rss_sizes.py --old-tree DIR        # also a build from another checkout

The loop child imports torch and diffusers only (no gradindex), loads the same model folder
and takes 8 per-sample gradients; the build: 24 images, K = 2, the default spec, one thread.
Writes ``benchmarks/results/peak_rss.json`` and ``peak_rss.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
LOOP = """
import numpy as np, torch
from diffusers import DDPMScheduler, UNet2DModel
torch.set_num_threads(1)
m = UNet2DModel.from_pretrained({unet!r}); s = DDPMScheduler(); ps = list(m.parameters())
x = torch.from_numpy(np.load({data!r})) * 2 - 1
for xi in x[:4]:
    for t in (0, 500):
        tt = torch.tensor([t]); e = torch.randn(1, *xi.shape)
        out = m(s.add_noise(xi[None], e, tt), tt).sample
        torch.autograd.grad((out - e).pow(2).mean(), ps)
"""


def _child(which: str, tree: str, work: Path) -> dict:
    """Runs one child from a fresh wrapper process (so RUSAGE_CHILDREN is that child's)."""
    code = (
        "import json, resource, subprocess, sys, time; t = time.time(); "
        "r = subprocess.run(json.loads(sys.argv[1]), env=json.loads(sys.argv[2]), "
        "capture_output=True, text=True); "
        "print(json.dumps({'rc': r.returncode, 'err': r.stderr[-800:], 'wall_s': time.time() - t, "
        "'peak_rss_mb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": tree}
    if which == "loop":
        cmd = [
            sys.executable,
            "-c",
            LOOP.format(unet=str(work / "ckpt/unet"), data=str(work / "x.npy")),
        ]
    else:
        out = work / f"idx_{which}"
        cmd = [sys.executable, "-c", "from gradindex.cli import main; main()", "build", "-c",
               str(work / "ckpt"), "--data", str(work / "x.npy"), "--out", str(out),
               "--timesteps", "2"]  # fmt: skip
    got = subprocess.run(  # in the work folder: `python -c` puts the cwd first on sys.path
        [sys.executable, "-c", code, json.dumps(cmd), json.dumps(env)],
        capture_output=True, text=True, check=True, cwd=work,
    )  # fmt: skip
    res = json.loads(got.stdout)
    if res["rc"]:
        raise SystemExit(f"{which} failed: {res['err']}")
    return {"which": which, "load_average": os.getloadavg()[0], **res}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--old-tree", help="another checkout's root, built the same way")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args()
    sys.path.insert(0, str(HERE))
    import numpy as np
    from diffusers import DDPMScheduler
    from featurize_sizes import _images, _model

    root = str(HERE.parent)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        _model("cifar").save_pretrained(work / "ckpt/unet")
        DDPMScheduler().save_pretrained(work / "ckpt/scheduler")
        np.save(work / "x.npy", _images("cifar", 24))
        runs = [_child("loop", root, work), _child("build", root, work)]
        if args.old_tree:
            runs.append(_child("build_old_tree", args.old_tree, work))
    loop = runs[0]["peak_rss_mb"]
    res = {"machine": platform.platform(), "cpus": os.cpu_count(), "runs": runs}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "peak_rss.json").write_text(json.dumps(res, indent=2, sort_keys=True) + "\n")
    lines = [
        "# Peak RSS: `gradindex build` (35.7M parameters, 24 images, K = 2) against a bare loop",
        "",
        f"Machine: {res['machine']}, {res['cpus']} CPUs; each a child measured from outside "
        "(`benchmarks/peak_rss_sizes.py`).",
        "",
        "| process | peak RSS MB | × loop | wall s | load average |",
        "|---|---|---|---|---|",
    ]
    for r in runs:
        lines.append(
            f"| {r['which']} | {r['peak_rss_mb']:.0f} | {r['peak_rss_mb'] / loop:.2f} "
            f"| {r['wall_s']:.0f} | {r['load_average']:.1f} |"
        )
    (args.out / "peak_rss.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
