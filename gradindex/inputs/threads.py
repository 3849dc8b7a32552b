"""OpenMP defaults that keep gradindex fast on a machine whose cores other jobs also use.

Holds:

- :func:`available_cpus` -- the CPUs this process may really use: its affinity mask, capped by
  a cgroup CPU quota (a container limited to 2 CPUs on a 64-core host sees 64 in
  ``os.cpu_count()``, and torch and OpenMP would start 32-64 threads).
- :func:`apply_openmp_defaults` -- called by ``gradindex/__init__.py`` before anything imports
  torch or FAISS, because libgomp reads its environment once, when it is loaded: a short spin
  (``GOMP_SPINCOUNT=1000``) before a waiting thread sleeps.

Why: with OpenMP's default wait policy an idle worker thread spins for a while at every barrier
before it sleeps. When other processes keep the cores busy, the spinning threads take the time
slices the working ones need, and every one of the thousands of parallel regions in a training
step waits for a descheduled thread. A passive policy (no spin) fixes the loaded case but
slows the idle one; a short spin keeps both (``benchmarks/bench_threads.py`` measures it idle
and loaded; the figures are in docs/threads.md).

Every default is an ``os.environ.setdefault``: a user's own setting wins, and explicit
``torch.set_num_threads`` calls are never touched. A program that imports torch before
gradindex has already loaded libgomp with its own settings; only its child processes see these.
"""

from __future__ import annotations

import math
import os
from collections.abc import MutableMapping
from pathlib import Path

SPIN_COUNT = "1000"
"""libgomp's spins at a barrier before a waiting thread sleeps (its default: 300,000): short
enough that a waiting thread yields its core to a working one on a loaded machine, long enough
that an idle machine keeps its speed (docs/threads.md)."""
_CGROUP_V2 = Path("/sys/fs/cgroup/cpu.max")
_CGROUP_V1 = (
    Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"),
    Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us"),
)


def cgroup_cpu_quota() -> float | None:
    """CPUs granted by the cgroup CPU quota (v2 ``cpu.max`` or v1 CFS), None when unlimited."""
    v2, v1 = _CGROUP_V2, _CGROUP_V1
    try:
        quota, period = v2.read_text().split()[:2]
    except (OSError, ValueError):
        try:
            quota, period = (p.read_text().strip() for p in v1)
        except (OSError, ValueError):
            return None
    if quota in ("max", "-1"):
        return None
    try:
        cpus = int(quota) / int(period)
    except (ValueError, ZeroDivisionError):
        return None
    return cpus if cpus > 0 else None


def _affinity_cpus() -> int:
    """CPUs in this process's affinity mask (all CPUs where the OS has no such mask)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1  # pragma: no cover - macOS / Windows


def available_cpus() -> int:
    """CPUs this process can use: affinity mask, capped by the cgroup quota (rounded up)."""
    quota = cgroup_cpu_quota()
    n = _affinity_cpus()
    return n if quota is None else min(n, max(1, math.ceil(quota)))


def apply_openmp_defaults(environ: MutableMapping[str, str] = os.environ) -> dict[str, str]:
    """Set GOMP_SPINCOUNT=1000, and OMP_NUM_THREADS when a cgroup quota caps the CPUs below
    the affinity mask (torch and OpenMP would not see the cap), unless the user set them (or
    OMP_WAIT_POLICY, whose spin count the user then chose).

    Returns what it set. Takes effect only for an OpenMP runtime loaded afterwards.
    """
    wanted = {"GOMP_SPINCOUNT": SPIN_COUNT}
    if available_cpus() < _affinity_cpus():  # a cgroup quota torch and OpenMP do not see
        wanted["OMP_NUM_THREADS"] = str(available_cpus())
    if "OMP_WAIT_POLICY" in environ:  # the user chose libgomp's spinning themselves
        del wanted["GOMP_SPINCOUNT"]
    done = {}
    for key, value in wanted.items():
        if key not in environ:
            environ[key] = value
            done[key] = value
    return done
