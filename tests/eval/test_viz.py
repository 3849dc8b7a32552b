"""gradindex.eval.viz: the attribution grid is readable on its own (big tiles, no empty margins, a
caption that says what the scores mean), judged from the saved PNG's pixels."""

from __future__ import annotations

import numpy as np
from PIL import Image

from gradindex.eval.viz import attribution_grid, score_caption


def _longest_dark_run(gray: np.ndarray) -> int:
    """Longest horizontal run of black pixels in any row: the width of a black tile."""
    best = 0
    for row in gray < 8:
        edges = np.flatnonzero(np.diff(np.concatenate([[0], row.astype(np.int8), [0]])))
        if edges.size:
            best = max(best, int((edges[1::2] - edges[::2]).max()))
    return best


def test_attribution_grid_has_big_tiles_tight_layout_and_ids(tmp_path):
    rng = np.random.default_rng(0)
    train = np.zeros((30, 1, 8, 8), np.float32)  # black tiles: their width is measurable
    train[:, :, 3:5, 3:5] = 1.0  # a white dot in the middle, as a digit would have
    queries = rng.random((4, 1, 8, 8), dtype=np.float32)
    k = 5
    results = {
        "tracin": (np.sort(rng.random((4, k)))[:, ::-1], rng.integers(0, 30, (4, k))),
        "retrac": (2.9 - np.sort(rng.random((4, k))), rng.integers(0, 30, (4, k))),
    }
    path = attribution_grid(
        queries,
        train,
        results,
        tmp_path / "grid.png",
        train_labels=list(range(30)),
        weights=[1.0, 2.0],
    )
    with Image.open(path) as im:
        w, h = im.size
        gray = np.asarray(im.convert("L"))
    assert 900 <= w <= 2000 and 450 <= h <= 1200, (w, h)
    # tiles of ~1 inch at 110 dpi (the old grid drew ~40-55 px tiles)
    assert _longest_dark_run(gray) >= 90
    # the ink spans the canvas: no wide empty margins (the old grid left ~15% of each side)
    ink_cols = np.flatnonzero((gray < 200).any(0))
    ink_rows = np.flatnonzero((gray < 200).any(1))
    assert ink_cols[0] < 0.02 * w and ink_cols[-1] > 0.95 * w, (ink_cols[0], ink_cols[-1], w)
    assert ink_rows[0] < 0.05 * h and ink_rows[-1] > 0.95 * h, (ink_rows[0], ink_rows[-1], h)


def test_score_caption_explains_both_scales():
    text = score_caption(["tracin", "retrac"], [0.5, 1.0, 1.5], labels=True)
    assert "unbounded" in text and "inner product" in text
    assert "at most $\\Sigma_c w_c$ = 3 here" in text  # ReTrac: a sum of weighted cosines
    assert "#training id · label" in text
    assert "label" not in score_caption(["retrac"], None).split(".")[0]
