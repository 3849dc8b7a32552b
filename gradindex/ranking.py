"""Row-wise rank correlation, shared by the build's fidelity check and the LDS benchmark."""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata

from gradindex.errors import DataError


def spearman_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation between a[t] and b[t] for every row t: [T, S], [T, S] → [T].
    A constant row gives NaN."""
    a, b = np.atleast_2d(np.asarray(a, np.float64)), np.atleast_2d(np.asarray(b, np.float64))
    if a.shape != b.shape:
        raise DataError(f"shapes differ: {a.shape} vs {b.shape}")
    ra, rb = rankdata(a, axis=1), rankdata(b, axis=1)  # average ranks for ties
    ra -= ra.mean(axis=1, keepdims=True)
    rb -= rb.mean(axis=1, keepdims=True)
    den = np.sqrt((ra**2).sum(axis=1) * (rb**2).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return (ra * rb).sum(axis=1) / den
