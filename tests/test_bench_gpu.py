"""benchmarks/bench_gpu.py ``--sections cifar`` (issue 29's GPU check, prepared for a GPU session):
the tiny CPU mode end to end, the guarded part runner, and TRAK's per-draw gradient route
against a plain autograd loop."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
import gpu_cifar  # noqa: E402
import guarded  # noqa: E402
from gpu_cifar_md import PARTS  # noqa: E402

BUILDS = ("warmup", "auto_b16", "auto_b64", "auto_b128", "auto_b128_mem", "sjlt_full_b16")


@pytest.mark.slow
def test_tiny_cpu_run_writes_every_part_with_figures_or_a_reason(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, str(BENCH / "bench_gpu.py"), "--sections", "cifar"]
    cmd += ["--device", "cpu", "--tiny", "--out", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    res = json.loads((tmp_path / "gpu_cifar_tiny.json").read_text())
    parts, cfg = res["parts"], gpu_cifar.SETTINGS["tiny"]
    assert list(parts) == list(PARTS)
    for name, r in parts.items():
        assert r["status"] == "ok" or r["reason"], name
    assert parts["trak"]["status"] == "not run"  # a CPU: no CudaProjector, and it says why
    assert "CudaProjector" in parts["trak"]["reason"]
    ok = {n: r for n, r in parts.items() if r["status"] == "ok"}
    assert set(ok) == set(PARTS) - {"trak"}, {n: r.get("reason") for n, r in parts.items()}
    assert ok["loop"]["draws"] == cfg["loop_images"] * cfg["k"]
    for name in BUILDS:
        r = ok[name]
        n = 16 if name == "warmup" else cfg["images"]
        assert r["draws"] == n * cfg["k"] and r["draws_per_s"] > 0, name
        assert r["featurize_s"] > 0 and r["gradient_calls"] >= 1 and r["items_per_call"], name
        assert r["spec"]["projection"] in ("sjlt", "kronecker-sjlt"), name
    assert ok["auto_b16"]["batch_size"] == 16 and ok["auto_b128"]["batch_size"] == 128
    assert ok["sjlt_full_b16"]["featurize_record"]["path"] == "full"
    for name in ("cpu_auto", "cpu_sjlt"):  # the same device here: rounding only
        r = ok[name]
        assert r["tracin"]["max_row_rel_error"] < 1e-4 and r["retrac"]["rel_error"] < 1e-4
        assert r["norms_max_rel_error"] < 1e-4
    md = (tmp_path / "gpu_cifar_tiny.md").read_text()
    assert all(f"| {name} |" in md for name in PARTS)


def test_run_parts_records_failures_and_stops_and_skips_past_the_budget(monkeypatch) -> None:
    monkeypatch.setattr(guarded, "MIN_PART_S", 0.05)
    writes: list[list[str]] = []

    def fails() -> dict:
        raise RuntimeError("out of memory\nsecond line")

    def missing() -> dict:
        raise guarded.NotRun("no fast_jl")

    def slow() -> dict:
        time.sleep(30)
        return {"never": 1}

    plan = [("a", lambda: {"x": 1.0}), ("b", fails), ("c", missing), ("d", slow)]
    plan += [("e", lambda: {"x": 2.0})]
    start = time.monotonic()
    parts = guarded.run_parts(plan, 3.0, lambda p: writes.append(list(p)))
    assert time.monotonic() - start < 10  # the alarm stopped the sleep at the budget
    assert parts["a"]["status"] == "ok" and parts["a"]["x"] == 1.0
    assert parts["b"]["status"] == "failed"
    assert parts["b"]["reason"] == "RuntimeError: out of memory"  # its first line
    assert parts["c"]["status"] == "not run" and parts["c"]["reason"] == "no fast_jl"
    assert parts["d"]["status"] == "stopped" and "never" not in parts["d"]
    assert parts["e"]["status"] == "skipped" and "budget" in parts["e"]["reason"]
    assert writes == [list("abcde"[: i + 1]) for i in range(5)]  # after every part


def test_functional_rows_equal_projected_loop_gradients(monkeypatch) -> None:
    """TRAK's route (vmap per-draw gradients, projected chunk by chunk) against a plain
    autograd loop over the same draws, projected by the same map."""
    from gradindex.featurize.losses import diffusion_loss
    from gradindex.featurize.projection import make_projector

    monkeypatch.setattr(gpu_cifar, "TRAK_CHUNK", 4)  # 10 draws: chunks of 4, 4, 2
    cfg = gpu_cifar.SETTINGS["tiny"]
    feat = gpu_cifar._featurizer(cfg["config"], cfg["k"], "cpu")
    items = gpu_cifar._draw_items(feat, gpu_cifar._images(cfg["config"], 5))
    proj = make_projector("sjlt", feat.num_params, 64, 3, nnz=2)
    rows, seconds = gpu_cifar.functional_rows(feat, items, proj.project)
    named = dict(feat.model.named_parameters())
    params = [named[n] for n in feat.param_names]
    loop = []
    for x, t, y in zip(*items, strict=True):
        out = feat.model(x[None], t[None]).sample
        grads = torch.autograd.grad(diffusion_loss(out, y[None], "mse"), params)
        loop.append(torch.cat([g.reshape(-1) for g in grads]))
    want = proj.project(torch.stack(loop))
    assert rows.shape == (10, 64) and seconds >= 0
    np.testing.assert_allclose(rows.numpy(), want.numpy(), rtol=1e-4, atol=1e-5)
