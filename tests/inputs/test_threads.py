"""Tests for gradindex.inputs.threads and the thread policy of gradindex.search.faiss_index: the caller's torch
threads survive builds and searches, FAISS runs on the threads it was given, and the OpenMP
runtime a fresh ``gradindex`` process loads has a passive wait policy unless the user said
otherwise."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch

from gradindex.inputs import threads
from gradindex.search.faiss_index import VectorIndex, batch_threads, set_num_threads

ROOT = Path(__file__).resolve().parents[2]


class RecordingIndex:
    """Stands in for a FAISS index: records the OpenMP thread count FAISS is called with."""

    def __init__(self, index: faiss.Index) -> None:
        self.index, self.seen = index, []

    def __getattr__(self, name: str):
        return getattr(self.index, name)

    def search(self, q: np.ndarray, k: int):
        self.seen.append(faiss.omp_get_max_threads())
        return self.index.search(q, k)


def rows(n: int = 200, d: int = 8) -> np.ndarray:
    x = np.random.default_rng(0).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def recording(kind: str = "flat") -> tuple[VectorIndex, RecordingIndex]:
    vi = VectorIndex.build(rows(), "retrac", kind=kind)
    rec = RecordingIndex(vi._index)
    vi._index = rec
    if vi._flat is rec.index:
        vi._flat = rec
    return vi, rec


@pytest.fixture
def torch_threads():
    """Restore torch's thread count and gradindex's FAISS setting after the test."""
    before = torch.get_num_threads()
    yield
    set_num_threads(None)
    torch.set_num_threads(before)


@pytest.mark.parametrize("explicit", [None, 3])
def test_build_and_search_leave_torch_threads_alone(torch_threads, monkeypatch, explicit) -> None:
    monkeypatch.delenv("GRADINDEX_NUM_THREADS", raising=False)
    torch.set_num_threads(1)
    set_num_threads(explicit)
    x = rows()
    for kind in ("flat", "hnsw"):
        vi = VectorIndex.build(x, "retrac", kind=kind)
        assert torch.get_num_threads() == 1
        vi.search(x[:7], 3)
        assert torch.get_num_threads() == 1
        vi.search(x[:1], 3)
        assert torch.get_num_threads() == 1


def test_faiss_runs_on_the_threads_set_then_the_callers_count_returns(torch_threads) -> None:
    torch.set_num_threads(2)
    vi, rec = recording()
    set_num_threads(3)
    vi.search(rows()[:5], 3)
    vi.search(rows()[:1], 3)
    assert rec.seen == [3, 1]  # batches on the threads set, a single query on one
    assert faiss.omp_get_max_threads() == torch.get_num_threads() == 2


def test_default_batch_threads_follow_the_callers_torch_setting(torch_threads, monkeypatch):
    monkeypatch.delenv("GRADINDEX_NUM_THREADS", raising=False)
    set_num_threads(None)
    torch.set_num_threads(1)
    vi, rec = recording()
    vi.search(rows()[:5], 3)
    assert rec.seen == [1] and batch_threads() == 1
    monkeypatch.setenv("GRADINDEX_NUM_THREADS", "3")
    vi.search(rows()[:5], 3)
    assert rec.seen == [1, 3]
    assert torch.get_num_threads() == 1


def test_batch_threads_capped_by_the_cgroup_quota(torch_threads, monkeypatch, tmp_path) -> None:
    monkeypatch.delenv("GRADINDEX_NUM_THREADS", raising=False)
    set_num_threads(None)
    torch.set_num_threads(4)
    (tmp_path / "cpu.max").write_text("100000 100000\n")  # one CPU's worth of time
    monkeypatch.setattr(threads, "_CGROUP_V2", tmp_path / "cpu.max")
    assert batch_threads() == 1


@pytest.mark.parametrize(
    "v2, v1, expected",
    [
        ("150000 100000\n", None, 1.5),
        ("max 100000\n", None, None),
        (None, ("200000\n", "100000\n"), 2.0),
        (None, ("-1\n", "100000\n"), None),
        (None, None, None),
    ],
)
def test_cgroup_cpu_quota(monkeypatch, tmp_path, v2, v1, expected) -> None:
    paths = tmp_path / "cpu.max", (tmp_path / "quota", tmp_path / "period")
    if v2 is not None:
        paths[0].write_text(v2)
    for path, text in zip(paths[1], v1 or ()):
        path.write_text(text)
    monkeypatch.setattr(threads, "_CGROUP_V2", paths[0])
    monkeypatch.setattr(threads, "_CGROUP_V1", paths[1])
    assert threads.cgroup_cpu_quota() == expected


def test_openmp_defaults_respect_the_users_settings(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setattr(threads, "_CGROUP_V2", tmp_path / "none")
    monkeypatch.setattr(threads, "_CGROUP_V1", (tmp_path / "none", tmp_path / "none"))
    env: dict[str, str] = {}
    assert threads.apply_openmp_defaults(env) == {"GOMP_SPINCOUNT": "1000"}
    assert env == {"GOMP_SPINCOUNT": "1000"}  # no quota: torch's own thread default stays
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert threads.apply_openmp_defaults(env) == {} and "GOMP_SPINCOUNT" not in env
    env = {"GOMP_SPINCOUNT": "10000"}
    assert threads.apply_openmp_defaults(env) == {} and env["GOMP_SPINCOUNT"] == "10000"
    (tmp_path / "cpu.max").write_text("250000 100000\n")  # 2.5 CPUs of 8
    monkeypatch.setattr(threads, "_CGROUP_V2", tmp_path / "cpu.max")
    env = {}
    threads.apply_openmp_defaults(env)
    assert env == {"GOMP_SPINCOUNT": "1000", "OMP_NUM_THREADS": "3"}
    env = {"OMP_NUM_THREADS": "1"}
    threads.apply_openmp_defaults(env)
    assert env["OMP_NUM_THREADS"] == "1"


def openmp_settings(env: dict[str, str]) -> str:
    """libgomp's own report (OMP_DISPLAY_ENV) of a fresh process that starts like the CLI."""
    code = "import gradindex.cli.main, torch; torch.ones(4).sum()"
    env = {**env, "PYTHONPATH": str(ROOT), "OMP_DISPLAY_ENV": "VERBOSE"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return out.stdout + out.stderr


def test_the_cli_loads_openmp_with_a_short_spin() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    report = openmp_settings(env)
    assert "GOMP_SPINCOUNT = '1000'" in report  # not libgomp's 300000: a short spin, then sleep
    report = openmp_settings({**env, "OMP_WAIT_POLICY": "PASSIVE"})
    assert "GOMP_SPINCOUNT = '0'" in report  # the user's own setting wins
    report = openmp_settings({**env, "GOMP_SPINCOUNT": "300000"})
    assert "GOMP_SPINCOUNT = '300000'" in report
