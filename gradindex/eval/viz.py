"""Pictures people would rather look at than read: attribution grids and the timestep bias.

Holds:
- ``attribution_grid``: one row per query image — the image, its top-k training images by
  TracIn, then by ReTrac, each tile with its score and training id (and label) under it, and a
  caption saying what the scores mean (``score_caption``).
- ``timestep_norm_plot``: per-draw gradient norm against timestep over the training set
  (median and 10–90% band per checkpoint, log scale): the bias that ReTrac removes.

matplotlib runs headless (Agg); images are float [N, C, H, W] in [0, 1].
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np


def pyplot():  # noqa: ANN201 - matplotlib.pyplot
    """pyplot on the file-only Agg backend, imported on first use: few commands draw."""
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


TILE_IN = 0.95
"""Side of one image tile in inches (about 105 px at the saved 110 dpi)."""
_TEXT_IN = 0.38  # room under a tile for its score and training id / label
_PAD_IN = 0.06  # between neighbouring tiles
_GAP_IN = 0.35  # between the query column and each method's block
_METHOD_NAMES = {
    "tracin": "Diffusion-TracIn",
    "retrac": "Diffusion-ReTrac",
    "trak": "TRAK (kernel)",
    "retrak": "ReTrac kernel",
}


def score_caption(
    methods: Sequence[str], weights: Sequence[float] | None = None, labels: bool = False
) -> str:
    """What the scores under the tiles mean, and why the two methods' scales differ."""
    bound = f" = {sum(weights):.3g} here" if weights is not None else ""
    parts = [f"Under each tile: its score, then #training id{' · label' if labels else ''}."]
    if "tracin" in methods:
        parts.append(
            r"TracIn score = $\Sigma_c w_c\,\langle g_c(query), g_c(train)\rangle$, a weighted "
            "inner product of the (projected) loss gradients at each checkpoint c: unbounded, "
            "its scale follows the gradient norms, so compare it only within its own column."
        )
    if "retrac" in methods:
        parts.append(
            r"ReTrac score = $\Sigma_c w_c\,\cos(r_c(query), r_c(train))$, with $r_c$ the "
            rf"gradient normalized per timestep: at most $\Sigma_c w_c${bound}, reached when the "
            "gradients point the same way at every checkpoint."
        )
    if "trak" in methods or "retrak" in methods:
        parts.append(
            r"TRAK / ReTrac kernel score = $\Sigma_c w_c\,x_c(query)^T (G_c + \lambda_c I)^{-1} "
            r"x_c(train)$, with $x_c$ the TracIn / ReTrac vectors and $G_c$ their Gram over the "
            "training set: the kernel discounts directions many training samples share."
        )
    parts.append(r"$w_c$: the TracIn weight of checkpoint c (learning rate × steps).")
    return " ".join(parts)


def _wrap(text: str, width: int) -> str:
    """textwrap.fill that never breaks inside a $...$ mathtext span."""
    import re
    import textwrap

    glued = re.sub(r"\$[^$]*\$", lambda m: m.group(0).replace(" ", "\0"), text)
    return textwrap.fill(glued, width=width).replace("\0", " ")


def attribution_grid(
    queries: np.ndarray,
    train_images: np.ndarray,
    results: Mapping[str, tuple[np.ndarray, np.ndarray]],
    path: str | Path,
    query_titles: Sequence[str] | None = None,
    train_ids: Sequence[object] | None = None,
    train_labels: Sequence[object] | None = None,
    weights: Sequence[float] | None = None,
) -> Path:
    """results: method → (scores [Q, k], rows [Q, k]) with rows indexing ``train_images``.

    One row per query: the query image, then each method's top-k training images, each tile
    with its score and the training id (and label, when ``train_labels`` is given) under it; a
    caption says what the scores mean (``weights``: the checkpoint weights w_c, for ReTrac's
    bound). The figure is laid out in inches, so it has no empty margins whatever Q and k.
    """
    plt = pyplot()
    methods = list(results)
    k = max(results[m][1].shape[1] for m in methods)
    n_q = len(queries)
    row_h = TILE_IN + _TEXT_IN
    step = TILE_IN + _PAD_IN
    width = TILE_IN + len(methods) * (_GAP_IN + k * step) + 0.2
    caption = _wrap(score_caption(methods, weights, train_labels is not None), int(width * 13))
    cap_h = 0.22 * (caption.count("\n") + 1) + 0.15
    head_h = 0.45
    height = head_h + n_q * row_h + cap_h
    fig = plt.figure(figsize=(width, height))

    def tile(x_in: float, q: int, image: np.ndarray, text: str) -> None:
        y_in = height - head_h - q * row_h - TILE_IN  # bottom of the tile, from the bottom edge
        ax = fig.add_axes((x_in / width, y_in / height, TILE_IN / width, TILE_IN / height))
        img, cmap = _tile(image)
        ax.imshow(img, cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.text(0.5, -0.04, text, transform=ax.transAxes, ha="center", va="top", fontsize=7)

    for q in range(n_q):
        tile(0.1, q, queries[q], query_titles[q] if query_titles else f"query {q}")
        for j, method in enumerate(methods):
            scores, rows_m = results[method]
            x0 = 0.1 + TILE_IN + _GAP_IN + j * (_GAP_IN + k * step)
            for i in range(rows_m.shape[1]):
                r = int(rows_m[q, i])
                name = train_ids[r] if train_ids is not None else r
                label = f" · {train_labels[r]}" if train_labels is not None else ""
                tile(x0 + i * step, q, train_images[r], f"{scores[q, i]:.3g}\n#{name}{label}")
    for j, method in enumerate(methods):
        x0 = 0.1 + TILE_IN + _GAP_IN + j * (_GAP_IN + k * step)
        fig.text(
            (x0 + k * step / 2) / width,
            1 - 0.2 / height,
            f"{_METHOD_NAMES.get(method, method)}: top {k}",
            ha="center",
            va="center",
            fontsize=10,
            fontweight="bold",
        )
    fig.text(0.1 / width, 0.1 / height, caption, ha="left", va="bottom", fontsize=8.5)
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
    plt = pyplot()
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
