"""Pictures people would rather look at than read: attribution grids and the timestep bias.

Holds:
- ``attribution_grid``: one row per query image — the image, its top-k training images by
  TracIn, then by ReTrac, each tile titled with its score.
- ``timestep_norm_plot``: per-draw gradient norm against timestep over the training set
  (median and 10–90% band per checkpoint, log scale): the bias that ReTrac removes.

matplotlib runs headless (Agg); images are float [N, C, H, W] in [0, 1].
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _tile(image: np.ndarray) -> tuple[np.ndarray, str | None]:
    """[C, H, W] in [0, 1] → an array imshow takes, and its colormap."""
    img = np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0)
    if img.shape[0] == 1:
        return img[0], "gray"
    return np.moveaxis(img[:3], 0, -1), None


def attribution_grid(
    queries: np.ndarray,
    train_images: np.ndarray,
    results: Mapping[str, tuple[np.ndarray, np.ndarray]],
    path: str | Path,
    query_titles: Sequence[str] | None = None,
) -> Path:
    """results: method → (scores [Q, k], rows [Q, k]) with rows indexing ``train_images``."""
    plt = _pyplot()
    methods = list(results)
    k = max(results[m][1].shape[1] for m in methods)
    cols = 1 + len(methods) * (k + 1) - 1  # query, then k tiles per method with a spacer between
    rows = len(queries)
    fig, axes = plt.subplots(rows, cols, figsize=(1.15 * cols, 1.35 * rows + 0.5), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for q in range(rows):
        img, cmap = _tile(queries[q])
        axes[q, 0].imshow(img, cmap=cmap, vmin=0, vmax=1)
        axes[q, 0].set_title(query_titles[q] if query_titles else f"query {q}", fontsize=7)
        for j, method in enumerate(methods):
            scores, rows_m = results[method]
            start = 1 + j * (k + 1)  # tiles of method j; a spacer column follows them
            for i in range(rows_m.shape[1]):
                ax = axes[q, start + i]
                img, cmap = _tile(train_images[rows_m[q, i]])
                ax.imshow(img, cmap=cmap, vmin=0, vmax=1)
                ax.set_title(f"{scores[q, i]:.3g}", fontsize=6)
                for spine in ax.spines.values():
                    spine.set_visible(False)
    for j, method in enumerate(methods):
        start = 1 + j * (k + 1)
        mid = axes[0, min(start + k // 2, cols - 1)]
        mid.annotate(
            f"top-{k} by {'Diffusion-TracIn' if method == 'tracin' else 'Diffusion-ReTrac'}",
            xy=(0.5, 1.55),
            xycoords="axes fraction",
            ha="center",
            fontsize=9,
            fontweight="bold",
        )
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def timestep_norm_plot(
    norms: np.ndarray,
    draw_timesteps: Sequence[int],
    path: str | Path,
    checkpoint_labels: Sequence[str] | None = None,
) -> Path:
    """norms: [N, C, K·M] per-draw gradient norms; draw_timesteps: the K·M timesteps in order."""
    plt = _pyplot()
    ts = np.asarray(draw_timesteps)
    uniq = np.unique(ts)
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for c in range(norms.shape[1]):
        per_t = [norms[:, c, ts == t].ravel() for t in uniq]
        med = np.array([np.median(v) for v in per_t])
        lo = np.array([np.quantile(v, 0.1) for v in per_t])
        hi = np.array([np.quantile(v, 0.9) for v in per_t])
        label = checkpoint_labels[c] if checkpoint_labels else f"checkpoint {c}"
        (line,) = ax.plot(uniq, med, marker="o", ms=3, label=f"{label} (median)")
        ax.fill_between(uniq, lo, hi, color=line.get_color(), alpha=0.2)
    ax.set_yscale("log")
    ax.set_xlabel("diffusion timestep t")
    ax.set_ylabel("per-sample gradient norm ‖∇θ ℓ‖")
    ratio = _spread(norms, ts)
    ax.set_title(
        f"Gradient norm by timestep (band: 10–90% of samples); median max/min = {ratio:.0f}×",
        fontsize=9,
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _spread(norms: np.ndarray, ts: np.ndarray) -> float:
    """Ratio of the largest to the smallest per-timestep median norm (all checkpoints)."""
    meds = [np.median(norms[:, :, ts == t]) for t in np.unique(ts)]
    return float(max(meds) / max(min(meds), 1e-30))
