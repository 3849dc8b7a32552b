"""gradindex serve under a burst of concurrent uploads: peak server memory with the upload bound
(``Limits.max_queries``, default 4: more are answered 503) against the same server unbounded.

A tiny index (two 8x8 checkpoints, 16 rows) is built in a temporary folder; each server runs in
its own process (uvicorn on a loopback port) and BURST client threads post the same grayscale
PNG at once. Per server: the answers by status, the wall time of the burst and the server's
peak resident memory (VmHWM from /proc) after the burst, less its resident memory before it.

Writes ``benchmarks/results/serve_burst.json`` / ``serve_burst.md``.

    python benchmarks/bench_serve_burst.py [--burst 380] [--side 1024]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
SERVER = """
import sys, uvicorn
from gradindex.serve.app import create_app
from gradindex.serve.limits import Limits
app = create_app(sys.argv[1], limits=Limits(max_queries=int(sys.argv[3]), reach_queries=16))
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="error")
"""


def build_index(root: Path) -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import gradindex as gi
    from tests.conftest import scheduler, tiny_unet

    train = np.random.default_rng(0).random((16, 1, 8, 8), dtype=np.float32)
    spec = gi.BuildSpec(proj_dim=64, timesteps=2, batch_size=16)
    ckpts = [(tiny_unet(s), scheduler()) for s in (1, 2)]
    gi.build_index(checkpoints=ckpts, data=train, out=root / "idx", spec=spec, progress=False)
    for i, (model, _) in enumerate(ckpts):  # the server loads checkpoints from folders
        model.save_pretrained(root / f"ckpt{i}" / "unet")
    manifest = json.loads((root / "idx" / "manifest.json").read_text())
    for i, rec in enumerate(manifest["checkpoints"]):
        rec["source"] = str(root / f"ckpt{i}")
    from diffusers import DDPMScheduler

    for i in range(2):
        DDPMScheduler(num_train_timesteps=1000).save_pretrained(root / f"ckpt{i}" / "scheduler")
    (root / "idx" / "manifest.json").write_text(json.dumps(manifest))
    return root / "idx"


def rss_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {key} for pid {pid}")


def upload_body(side: int, boundary: str) -> bytes:
    from PIL import Image

    pixels = (np.random.default_rng(1).random((side, side)) * 255).astype(np.uint8)
    png = io.BytesIO()
    Image.fromarray(pixels).save(png, format="PNG")
    return (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="k"\r\n\r\n3\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="method"\r\n\r\ntracin\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="q.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        + png.getvalue()
        + f"\r\n--{boundary}--\r\n".encode()
    )


def burst(index: Path, bound: int, n: int, body: bytes, boundary: str) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER, str(index), str(port), str(bound)], env=env
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(url + "/style.css", timeout=1).read()
                break
            except OSError:
                time.sleep(0.1)
        warm = urllib.request.Request(url + "/query", data=body, headers={
            "Content-Type": f"multipart/form-data; boundary={boundary}"})  # fmt: skip
        urllib.request.urlopen(warm, timeout=300).read()  # checkpoints loaded before the burst
        before = rss_kib(proc.pid, "VmRSS")
        codes: list[int] = []

        def post() -> None:
            try:
                with urllib.request.urlopen(warm, timeout=600) as r:
                    codes.append(r.status)
            except urllib.error.HTTPError as exc:
                codes.append(exc.code)
            except OSError:
                codes.append(-1)

        threads = [threading.Thread(target=post) for _ in range(n)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        peak = rss_kib(proc.pid, "VmHWM")
    finally:
        proc.terminate()
        proc.wait(30)
    return {
        "bound": bound,
        "answers": {str(c): codes.count(c) for c in sorted(set(codes))},
        "burst_s": round(wall, 2),
        "rss_before_mib": round(before / 1024, 1),
        "peak_rss_mib": round(peak / 1024, 1),
        "peak_growth_mib": round((peak - before) / 1024, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--burst", type=int, default=380)
    ap.add_argument("--side", type=int, default=1024, help="side of the uploaded PNG")
    args = ap.parse_args()
    boundary = "benchb0undary"
    body = upload_body(args.side, boundary)
    with tempfile.TemporaryDirectory() as tmp:
        index = build_index(Path(tmp))
        runs = [burst(index, b, args.burst, body, boundary) for b in (10**6, 4)]
    result = {
        "machine": f"{platform.node()} ({os.cpu_count()} CPUs, shared)",
        "burst": args.burst,
        "upload_bytes": len(body),
        "runs": runs,
        "peak_growth_ratio_bounded_vs_unbounded": round(
            runs[1]["peak_growth_mib"] / max(runs[0]["peak_growth_mib"], 0.1), 3
        ),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "serve_burst.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# serve under a burst of {args.burst} uploads ({len(body) / 2**20:.2f} MiB each)",
        "",
        f"Machine: {result['machine']}. Same process layout, same upload, same run.",
        "",
        "| uploads in progress | answers | burst (s) | peak RSS (MiB) | growth over idle (MiB) |",
        "|---|---|---|---|---|",
    ]
    for r in runs:
        bound = "unbounded" if r["bound"] >= 10**6 else f"at most {r['bound']} (503 past it)"
        answers = ", ".join(f"{n} x {c}" for c, n in r["answers"].items())
        lines.append(
            f"| {bound} | {answers} | {r['burst_s']} | {r['peak_rss_mib']} | {r['peak_growth_mib']} |"
        )
    lines += [
        "",
        f"Growth, bounded / unbounded: {result['peak_growth_ratio_bounded_vs_unbounded']}",
    ]
    (RESULTS / "serve_burst.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
