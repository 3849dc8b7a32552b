"""Benchmark parts run one by one under a time budget, each guarded, so that one failure or a
slow part loses nothing already measured (``gpu_cifar.py``: a GPU session's one short run).

``run_parts`` skips a part when less of the budget is left than the longest part so far took
(and at least ``MIN_PART_S``), stops one that runs past the budget with an alarm, and records
each part's figures or ``{"status", "reason"}``, calling ``write`` after every part.
"""

from __future__ import annotations

import gc
import json
import signal
import time
from collections.abc import Callable

import torch

MIN_PART_S = 5.0


class OutOfBudget(Exception):
    """The run's time budget ran out inside a part."""


class NotRun(Exception):
    """A part that cannot run here (a package or device missing): the message says why."""


def _on_alarm(signum: int, frame: object) -> None:
    raise OutOfBudget


def run_parts(
    plan: list[tuple[str, Callable[[], dict]]], budget_s: float, write: Callable[[dict], None]
) -> dict:
    """Run each part, guarded: its figures, or ``{"status": ..., "reason": ...}`` when it failed,
    ran out of budget or was skipped; ``write(parts)`` after every part."""
    parts: dict[str, dict] = {}
    start, longest = time.monotonic(), 0.0
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    try:
        for name, part in plan:
            left = budget_s - (time.monotonic() - start)
            if left < max(longest, MIN_PART_S):
                parts[name] = {
                    "status": "skipped",
                    "reason": f"budget: {max(left, 0):.0f} s of {budget_s:.0f} s left, "
                    f"the longest part so far took {longest:.0f} s",
                }
            else:
                began = time.monotonic()
                signal.setitimer(signal.ITIMER_REAL, left)
                try:
                    parts[name] = {"status": "ok", **part()}
                except OutOfBudget:
                    parts[name] = {"status": "stopped", "reason": "the budget ran out inside it"}
                except NotRun as exc:
                    parts[name] = {"status": "not run", "reason": str(exc)}
                except Exception as exc:  # noqa: BLE001 - one part's failure is its record
                    first = (str(exc).strip().splitlines() or [""])[0][:300]
                    parts[name] = {"status": "failed", "reason": f"{type(exc).__name__}: {first}"}
                finally:
                    signal.setitimer(signal.ITIMER_REAL, 0)
                    parts[name]["part_seconds"] = time.monotonic() - began
                    longest = max(longest, parts[name]["part_seconds"])
                    gc.collect()
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
            print(f"  {name}: {json.dumps(parts[name], default=str)}", flush=True)
            write(parts)
    finally:
        signal.signal(signal.SIGALRM, previous)
    return parts
