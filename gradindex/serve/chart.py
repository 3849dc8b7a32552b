"""A training row's gradient-norm profile as an inline SVG (no plotting library per request)."""

from __future__ import annotations

import math
from typing import Any

WIDTH, HEIGHT, PAD = 520, 220, 44


def profile_svg(profile: list[dict[str, float]]) -> dict[str, Any]:
    """Per-timestep norms → what the template draws: two polylines (the row, the index
    median) on a log-y axis over the timesteps, with tick labels."""
    ts = [p["t"] for p in profile]
    values = [v for p in profile for v in (p["row"], p["median"]) if v > 0]
    if not ts or not values:
        return {"empty": True, "width": WIDTH, "height": HEIGHT}
    lo, hi = math.log10(min(values)), math.log10(max(values))
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    t0, t1 = min(ts), max(ts) if max(ts) > min(ts) else min(ts) + 1

    def x(t: float) -> float:
        return PAD + (t - t0) / (t1 - t0) * (WIDTH - 2 * PAD)

    def y(v: float) -> float:
        v = max(v, 10**lo)
        return HEIGHT - PAD + (lo - math.log10(v)) / (hi - lo) * (HEIGHT - 2 * PAD)

    def line(key: str) -> str:
        return " ".join(f"{x(p['t']):.1f},{y(p[key]):.1f}" for p in profile)

    return {
        "empty": False,
        "width": WIDTH,
        "height": HEIGHT,
        "pad": PAD,
        "row_line": line("row"),
        "median_line": line("median"),
        "row_points": [(x(p["t"]), y(p["row"])) for p in profile],
        "x_ticks": [(x(t), t) for t in ts],
        "y_ticks": [(y(10**e), f"{10**e:.3g}") for e in _decades(lo, hi)],
    }


def _decades(lo: float, hi: float) -> list[float]:
    """Log-axis tick exponents: whole decades, or the ends when the range is under one."""
    whole = list(range(math.ceil(lo), math.floor(hi) + 1))
    return [float(e) for e in whole] if len(whole) >= 2 else [lo, hi]
