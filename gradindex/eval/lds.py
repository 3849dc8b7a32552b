"""Linear datamodeling score (LDS): do attribution scores predict retrained models' losses?

Holds the math of the counterfactual benchmark (``benchmarks/bench_lds.py``), importable and
tested on its own:

- ``subset_masks(n, num_subsets, fraction, seeds)``: random training subsets as a bool [S, N].
- ``spearman_rows(a, b)``: Spearman correlation of each row pair (from ``gradindex.ranking``).
- ``lds_per_target(scores, masks, losses)``: per-target LDS [T].
- ``bootstrap_ci(values, ...)``: mean and percentile bootstrap interval over targets.
- ``trak_scores(train_features, target_features, lam)``: TRAK-style scores with the
  (ΦᵀΦ + λI)⁻¹ kernel, computed through the N×N Gram matrix.

Sign convention: a positive score means "this training sample lowers the target's loss", so the
prediction for subset s, Σ_{i∈s} score_i, is correlated with **minus** the measured loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from gradindex.errors import DataError
from gradindex.ranking import spearman_rows as spearman_rows  # re-exported: part of the LDS math


def subset_masks(n: int, num_subsets: int, fraction: float, seeds: Sequence[int]) -> np.ndarray:
    """bool [S, N]: subset s holds round(fraction·n) samples drawn without replacement by
    ``np.random.default_rng(seeds[s])``."""
    if len(seeds) != num_subsets:
        raise DataError(f"need one seed per subset: {len(seeds)} seeds for {num_subsets} subsets")
    if not 0 < fraction < 1:
        raise DataError(f"fraction must lie in (0, 1), got {fraction}")
    size = int(round(fraction * n))
    masks = np.zeros((num_subsets, n), dtype=bool)
    for s, seed in enumerate(seeds):
        masks[s, np.random.default_rng(int(seed)).permutation(n)[:size]] = True
    return masks


def lds_per_target(scores: np.ndarray, masks: np.ndarray, losses: np.ndarray) -> np.ndarray:
    """Per-target linear datamodeling score.

    scores: [T, N] attribution of training sample i to target t (higher = lowers its loss);
    masks: bool [S, N] subset membership; losses: [T, S] the target's measured loss under the
    model trained on subset s. Returns [T]: Spearman over s of (Σ_{i∈s} scores[t, i], −losses[t, s]).
    """
    scores = np.asarray(scores, np.float64)
    masks = np.asarray(masks)
    losses = np.asarray(losses, np.float64)
    if scores.ndim != 2 or masks.ndim != 2 or scores.shape[1] != masks.shape[1]:
        raise DataError(f"scores [T, N] and masks [S, N] disagree: {scores.shape}, {masks.shape}")
    if losses.shape != (scores.shape[0], masks.shape[0]):
        raise DataError(
            f"losses must be [T, S] = {(scores.shape[0], masks.shape[0])}, got {losses.shape}"
        )
    predicted = scores @ masks.T.astype(np.float64)  # [T, S]
    return spearman_rows(predicted, -losses)


@dataclass(frozen=True)
class Estimate:
    """A mean over targets with a percentile bootstrap interval."""

    mean: float
    low: float
    high: float
    n: int

    def to_dict(self) -> dict[str, float | int]:
        return {"mean": self.mean, "ci_low": self.low, "ci_high": self.high, "n": self.n}


def bootstrap_ci(
    values: np.ndarray, num_boot: int = 2000, level: float = 0.95, seed: int = 0
) -> Estimate:
    """Mean of ``values`` (NaNs dropped) and its percentile bootstrap interval, resampling
    targets with replacement."""
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        raise DataError("no finite values to bootstrap")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(num_boot, v.size))].mean(axis=1)  # [B]
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return Estimate(float(v.mean()), float(lo), float(hi), int(v.size))


def trak_scores(train_features: np.ndarray, target_features: np.ndarray, lam: float) -> np.ndarray:
    """TRAK-style scores φ(target)ᵀ (ΦᵀΦ + λI)⁻¹ Φᵀ: [N, D], [T, D] → [T, N].

    Uses (ΦᵀΦ + λI)⁻¹Φᵀ = Φᵀ(ΦΦᵀ + λI)⁻¹, so only an N×N system is solved. ``lam`` is absolute;
    callers usually scale it by trace(ΦΦᵀ)/N.
    """
    phi = np.asarray(train_features, np.float64)  # [N, D]
    q = np.asarray(target_features, np.float64)  # [T, D]
    if lam <= 0:
        raise DataError(f"lam must be positive, got {lam}")
    gram = phi @ phi.T  # [N, N]
    gram[np.diag_indices_from(gram)] += lam
    cross = q @ phi.T  # [T, N]
    return np.linalg.solve(gram, cross.T).T  # gram is symmetric: (G⁻¹ crossᵀ)ᵀ = cross G⁻¹
