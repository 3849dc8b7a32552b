"""Diagnostics of an opened index: the timestep bias, generally influential samples, self-retrieval.

Holds pure functions over arrays (usable on any index or benchmark) and ``report``, the one
entry point behind ``gradindex report INDEX``:

- ``norm_by_timestep(norms, draw_timesteps)``: per-timestep quantiles of the per-draw gradient
  norms ``[N, C, K·M]``, the p90/p10 ratio within each timestep, and the spread across
  timesteps (max/min of the per-timestep medians; p90/p10 of those medians).
- ``topk_concentration(rows, top=10)``: over Q top-k lists ``[Q, k]``, the number of distinct
  training rows and the share of all Q·k slots taken by the ``top`` most frequent ones — the
  "generally influential" samples of Diffusion-ReTrac (arXiv 2401.09031).
- ``reach(rows, n)`` and ``reach_norm_correlation(reach, norms)``: how often each training row
  appears in the top-k lists, and its Spearman correlation with the row's gradient norm.
- ``self_retrieval(index, rows, method)``: share of training rows whose own stored vector
  returns them at rank 1.
- ``report(index, queries=None, k=10, out_dir=None)`` → a JSON-able dict (and PNG figures in
  ``out_dir`` when given); ``format_report(result)`` → its human summary, each number explained.

Nothing here changes the index; every function reads stored rows or search results.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gradindex.errors import IndexStateError, SearchError
from gradindex.eval.viz import pyplot, timestep_norm_plot
from gradindex.query import AttributionIndex
from gradindex.spec import METHODS
from gradindex.store.kernel import KERNEL_METHODS

logger = logging.getLogger(__name__)

TITLES = {
    "tracin": "Diffusion-TracIn",
    "retrac": "Diffusion-ReTrac",
    "trak": "TRAK (kernel, TracIn rows)",
    "retrak": "ReTrac kernel",
}


def report_methods(index: AttributionIndex) -> list[str]:
    """The stored methods, and the kernel methods the index's kernel serves."""
    out = list(METHODS)
    for m in KERNEL_METHODS:
        try:
            index.check_kernel(m)
        except IndexStateError:  # built before kernels / too wide: reported without them
            continue
        out.append(m)
    return out


def norm_by_timestep(norms: np.ndarray, draw_timesteps: Sequence[int]) -> dict[str, Any]:
    """norms: [N, C, K·M] per-draw gradient norms; draw_timesteps: the K·M timesteps in order.

    Returns per timestep (ascending) the 10/50/90% quantiles over samples, checkpoints and noise
    draws and their p90/p10 ratio; ``median_max_over_min`` (largest / smallest per-timestep
    median) and ``median_p90_over_p10`` (90th / 10th percentile of the per-timestep medians).
    """
    norms = np.asarray(norms, dtype=np.float64)
    ts = np.asarray(draw_timesteps)
    if norms.ndim != 3 or norms.shape[2] != len(ts):
        raise SearchError(
            f"norms has shape {norms.shape}; expected [N, C, {len(ts)}] for {len(ts)} draws"
        )
    uniq = np.unique(ts)
    per_t = [norms[:, :, ts == t].ravel() for t in uniq]
    p10 = np.array([np.quantile(v, 0.1) for v in per_t])
    p50 = np.array([np.median(v) for v in per_t])
    p90 = np.array([np.quantile(v, 0.9) for v in per_t])
    tiny = 1e-30
    return {
        "timesteps": uniq.tolist(),
        "p10": p10.tolist(),
        "median": p50.tolist(),
        "p90": p90.tolist(),
        "within_timestep_p90_over_p10": (p90 / np.maximum(p10, tiny)).tolist(),
        "median_max_over_min": float(p50.max() / max(p50.min(), tiny)),
        "median_p90_over_p10": float(np.quantile(p50, 0.9) / max(np.quantile(p50, 0.1), tiny)),
        "argmax_timestep": int(uniq[int(np.argmax(p50))]),
        "argmin_timestep": int(uniq[int(np.argmin(p50))]),
    }


def reach(rows: np.ndarray, n: int) -> np.ndarray:
    """rows: [Q, k] training-row numbers of top-k lists → [n] appearances per training row."""
    rows = np.asarray(rows)
    return np.bincount(rows[rows >= 0].ravel(), minlength=n)[:n]


def topk_concentration(rows: np.ndarray, top: int = 10) -> dict[str, Any]:
    """Over Q top-k lists ``rows`` [Q, k]: distinct training rows, and the share of all slots
    taken by the ``top`` most frequent rows (1.0 = the same few rows top every list)."""
    rows = np.asarray(rows)
    valid = rows[rows >= 0]
    if valid.size == 0:
        raise SearchError("no search results to summarize")
    _, counts = np.unique(valid, return_counts=True)
    counts = np.sort(counts)[::-1]
    return {
        "num_queries": int(rows.shape[0]),
        "k": int(rows.shape[1]),
        "slots": int(valid.size),
        "distinct": int(counts.size),
        "distinct_fraction_of_slots": float(counts.size / valid.size),
        f"top{top}_share": float(counts[:top].sum() / valid.size),
        "max_count": int(counts[0]),
    }


def reach_norm_correlation(reach_counts: np.ndarray, sample_norms: np.ndarray) -> dict[str, float]:
    """Spearman correlation between each training row's reach and its gradient norm, over all
    rows, and over the rows that appear at least once."""
    from scipy.stats import spearmanr

    r = np.asarray(reach_counts, dtype=np.float64)
    s = np.asarray(sample_norms, dtype=np.float64)
    out = {"spearman_all": float("nan"), "spearman_reached": float("nan")}
    if r.std() > 0 and s.std() > 0:
        out["spearman_all"] = float(spearmanr(r, s)[0])
    hit = r > 0
    if hit.sum() > 2 and r[hit].std() > 0 and s[hit].std() > 0:
        out["spearman_reached"] = float(spearmanr(r[hit], s[hit])[0])
    # how much heavier the most-reached rows are than the typical row
    if hit.any():
        top = np.argsort(-r)[: max(1, min(10, int(hit.sum())))]
        out["top10_norm_over_median"] = float(np.median(s[top]) / max(np.median(s), 1e-30))
    return out


def self_retrieval(index: AttributionIndex, rows: np.ndarray, method: str) -> dict[str, float]:
    """Query each training row (store row numbers ``rows``) with its own stored vector: the share
    found at rank 1, and within the top 10."""
    vecs = index.vectors(KERNEL_METHODS.get(method, method))[rows]
    res = index.search(vecs, k=min(10, len(index.index_rows)), method=method)
    hit1 = res.rows[:, 0] == rows
    hit10 = (res.rows == rows[:, None]).any(1)
    return {"rank1": float(hit1.mean()), "top10": float(hit10.mean()), "num_rows": int(len(rows))}


def sample_norms(index: AttributionIndex) -> np.ndarray:
    """Per training row: mean of its per-draw gradient norms over checkpoints and draws [N]."""
    return index.norms.reshape(len(index.norms), -1).mean(1)


def _draw_timesteps(index: AttributionIndex) -> list[int]:
    spec = index.spec
    return [t for t in index.manifest["timesteps"] for _ in range(spec.noise_draws)]


def report(
    index: AttributionIndex,
    queries: np.ndarray | None = None,
    k: int = 10,
    out_dir: Path | None = None,
    *,
    query_vectors: Mapping[str, np.ndarray] | None = None,
    max_self_queries: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Diagnostics of ``index`` as a JSON-able dict; PNG figures in ``out_dir`` when given.

    Queries: test images (embedded with the index's checkpoints), or ``query_vectors``
    ({"tracin": [Q, D], "retrac": [Q, D]}, already embedded), or neither: then up to
    ``max_self_queries`` training rows (seeded sample) are queried with their stored vectors and
    each row's own match is dropped from its list, so the lists hold *other* training samples.
    """
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k <= 0:
        raise SearchError(f"k={k!r}: must be a positive integer")
    n = len(index)
    rng = np.random.default_rng(seed)
    usable = index.index_rows
    self_rows = np.sort(rng.choice(usable, min(max_self_queries, len(usable)), replace=False))

    if query_vectors is not None:
        source = "query_vectors"
        qv = {m: np.asarray(query_vectors[m], np.float32) for m in METHODS}
    elif queries is not None:
        source = "images"
        qv = index.embed(queries)
    else:
        source = "training rows (self excluded)"
        qv = None

    methods: dict[str, Any] = {}
    lists: dict[str, np.ndarray] = {}
    norms_per_row = sample_norms(index)
    for m in report_methods(index):
        stored = KERNEL_METHODS.get(m, m)  # the rows a kernel method's queries are
        if qv is None:
            res = index.search(
                index.vectors(stored)[self_rows], k=min(k + 1, len(usable)), method=m
            )
            rows = _drop_self(res.rows, self_rows, k)
        else:
            rows = index.search(qv[stored], k=min(k, len(usable)), method=m).rows
        lists[m] = rows
        r = reach(rows, n)
        methods[m] = {
            "concentration": topk_concentration(rows),
            "reach_vs_norm": reach_norm_correlation(r, norms_per_row),
            "self_retrieval": self_retrieval(index, self_rows, m),
            "most_reached": [
                {"row": int(i), "id": _plain(index.ids[i]), "count": int(r[i])}
                for i in np.argsort(-r)[:10]
                if r[i] > 0
            ],
        }
    tr, re = methods["tracin"]["concentration"], methods["retrac"]["concentration"]
    out: dict[str, Any] = {
        "index": str(index.path),
        "num_rows": n,
        "num_flagged": int(index.flagged.sum()),
        "k": int(k),
        "queries": source,
        "num_queries": int(next(iter(lists.values())).shape[0]),
        "norm_by_timestep": norm_by_timestep(index.norms, _draw_timesteps(index)),
        "methods": methods,
        "retrac_over_tracin": {
            "distinct": re["distinct"] / max(tr["distinct"], 1),
            "top10_share": re["top10_share"] / max(tr["top10_share"], 1e-30),
        },
    }
    if out_dir is not None:
        out["figures"] = write_figures(index, lists, Path(out_dir))
    return out


def write_figures(
    index: AttributionIndex, lists: Mapping[str, np.ndarray], out_dir: Path, prefix: str = ""
) -> list[str]:
    """norms_by_timestep.png (median and 10–90% band per checkpoint) and reach_vs_norm.png."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [
        timestep_norm_plot(
            index.norms, _draw_timesteps(index), out_dir / f"{prefix}norms_by_timestep.png"
        )
    ]
    paths.append(
        plot_reach_vs_norm(
            {m: reach(r, len(index)) for m, r in lists.items()},
            sample_norms(index),
            out_dir / f"{prefix}reach_vs_norm.png",
        )
    )
    return [str(p) for p in paths]


def plot_reach_vs_norm(
    reach_by_method: Mapping[str, np.ndarray],
    norms: np.ndarray,
    path: Path,
    highlight: np.ndarray | None = None,
    title: str | None = None,
) -> Path:
    """One scatter per method: training row's gradient norm (x, log) against its reach (y);
    ``highlight`` ([N] bool) draws those rows in red (e.g. planted outliers)."""
    plt = pyplot()
    methods = list(reach_by_method)
    fig, axes = plt.subplots(1, len(methods), figsize=(4.2 * len(methods), 3.4), squeeze=False)
    for ax, m in zip(axes[0], methods, strict=True):
        r = reach_by_method[m]
        ax.scatter(norms, r, s=6, alpha=0.5, color="tab:blue", label="training samples")
        if highlight is not None and highlight.any():
            ax.scatter(norms[highlight], r[highlight], s=12, color="tab:red", label="outliers")
            ax.legend(fontsize=7)
        ax.set_xscale("log")
        ax.set_xlabel("mean per-draw gradient norm")
        ax.set_ylabel("appearances in top-k lists")
        ax.set_title(TITLES.get(m, m), fontsize=9)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def _drop_self(rows: np.ndarray, self_rows: np.ndarray, k: int) -> np.ndarray:
    """[Q, k+1] result rows → [Q, k] without each query's own row (or the last one); with
    fewer than k + 1 usable rows, [Q, N-1] (the lists were capped at every usable row)."""
    out = np.empty((rows.shape[0], min(k, rows.shape[1] - 1)), dtype=rows.dtype)
    for i, (r, s) in enumerate(zip(rows, self_rows, strict=True)):
        keep = r[r != s]
        out[i] = keep[: out.shape[1]]
    return out


def _plain(x: Any) -> Any:
    return x.item() if hasattr(x, "item") else x


def format_report(result: Mapping[str, Any], max_timesteps: int = 12) -> list[str]:
    """The human summary of ``report()``'s dict: the key diagnostics, one line each, with what
    they mean (``gradindex report --json`` prints the dict itself)."""
    nbt = result["norm_by_timestep"]
    methods = result["methods"]
    names = [m for m in TITLES if m in methods]
    conc = methods[names[0]]["concentration"]
    lines = [
        f"index {result['index']}: {result['num_rows']} rows ({result['num_flagged']} flagged)",
        f"queries {result['num_queries']} {result['queries']}, top {conc['k']} each",
        "",
        "Gradient norm by timestep (per-draw norms over samples, checkpoints and noise draws).",
        "TracIn sums raw gradients, so timesteps with large norms dominate its scores; ReTrac",
        "normalizes each timestep's gradient first.",
    ]
    lines += _timestep_lines(nbt, max_timesteps)
    lines += ["", "Generally influential samples: do the same few training rows top every list?"]
    lines += _method_lines(methods, names, conc["slots"])
    if "figures" in result:
        lines += ["", "figures: " + ", ".join(result["figures"])]
    return lines


def _timestep_lines(nbt: Mapping[str, Any], max_timesteps: int) -> list[str]:
    """A table of the per-timestep norm quantiles (evenly thinned when long) and the spread."""
    lines = [f"  {'timestep':>8s} {'p10':>10s} {'median':>10s} {'p90':>10s} {'p90/p10':>8s}"]
    ts = nbt["timesteps"]
    shown = range(len(ts))
    if len(ts) > max_timesteps:  # evenly spaced, first and last included
        shown = sorted({int(round(i)) for i in np.linspace(0, len(ts) - 1, max_timesteps)})
    for i in shown:
        lines.append(
            f"  {ts[i]:>8d} {nbt['p10'][i]:>10.4g} {nbt['median'][i]:>10.4g} "
            f"{nbt['p90'][i]:>10.4g} {nbt['within_timestep_p90_over_p10'][i]:>8.3g}"
        )
    if len(shown) < len(ts):
        lines.append(f"  ({len(shown)} of {len(ts)} timesteps shown; --json lists all)")
    lines.append(
        f"  medians differ {nbt['median_max_over_min']:.3g}x across timesteps (largest at "
        f"t={nbt['argmax_timestep']}, smallest at t={nbt['argmin_timestep']})"
    )
    return lines


def _method_lines(methods: Mapping[str, Any], names: list[str], slots: int) -> list[str]:
    """The methods side by side (TracIn, ReTrac, and the kernel methods when the index has a
    kernel), one diagnostic per line with what it means."""
    rows = [
        (
            "distinct rows",
            lambda m: f"{methods[m]['concentration']['distinct']}",
            f"training rows among all {slots} results (more = answers depend on the query)",
        ),
        (
            "top-10 share",
            lambda m: f"{methods[m]['concentration']['top10_share']:.2f}",
            "share of the results taken by the 10 most frequent rows (1 = same rows every time)",
        ),
        (
            "reach~norm",
            lambda m: _num(methods[m]["reach_vs_norm"]["spearman_all"]),
            "Spearman: how often a row is found vs its gradient norm (> 0: big gradients win)",
        ),
        (
            "self rank 1",
            lambda m: f"{methods[m]['self_retrieval']['rank1']:.2f}",
            "share of training rows that their own stored vector finds first",
        ),
    ]
    lines = [f"  {'':14s}" + "".join(f"{m:>8s}" for m in names)]
    for label, value, meaning in rows:
        lines.append(f"  {label:14s}" + "".join(f"{value(m):>8s}" for m in names) + f"  {meaning}")
    for m in names:
        top = ", ".join(f"{r['id']} ({r['count']}x)" for r in methods[m]["most_reached"][:5])
        lines.append(f"  most found by {m}: {top or '-'}")
    return lines


def _num(x: float) -> str:
    return "n/a" if x != x else f"{x:+.2f}"  # NaN: a constant reach or norm has no rank order
