"""The LDS math of the counterfactual benchmark: ≈ 1 when the truth is linear, ≈ 0 for random
scores, and bootstrap intervals that hold their estimate."""

import numpy as np
import pytest

from gradindex.errors import DataError
from gradindex.eval.lds import (
    bootstrap_ci,
    lds_per_target,
    spearman_rows,
    subset_masks,
    trak_scores,
)


def test_subset_masks_are_seeded_halves():
    m = subset_masks(11, 4, 0.5, seeds=[1, 2, 3, 4])
    assert m.shape == (4, 11) and (m.sum(axis=1) == 6).all()
    np.testing.assert_array_equal(m, subset_masks(11, 4, 0.5, seeds=[1, 2, 3, 4]))
    with pytest.raises(DataError, match="one seed per subset"):
        subset_masks(11, 4, 0.5, seeds=[1])


def test_spearman_matches_scipy_with_ties():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    a = rng.integers(0, 4, size=(3, 9)).astype(float)  # many ties
    b = rng.standard_normal((3, 9))
    expected = [stats.spearmanr(x, y).statistic for x, y in zip(a, b, strict=True)]
    np.testing.assert_allclose(spearman_rows(a, b), expected, atol=1e-12)


def test_lds_is_one_when_truth_is_linear():
    rng = np.random.default_rng(1)
    T, N, S = 5, 7, 4  # tiny: 4 subsets
    scores = rng.standard_normal((T, N))
    m = subset_masks(N, S, 0.5, seeds=range(S))
    losses = 3.0 - scores @ m.T  # higher influence → lower loss, exactly linear
    np.testing.assert_allclose(lds_per_target(scores, m, losses), 1.0)
    # a monotone (not linear) map of the truth still ranks the same
    np.testing.assert_allclose(lds_per_target(scores, m, np.exp(losses)), 1.0)
    # the sign convention: scores that predict *higher* loss give -1
    np.testing.assert_allclose(lds_per_target(-scores, m, losses), -1.0)


def test_lds_is_near_zero_for_random_scores():
    rng = np.random.default_rng(2)
    T, N, S = 400, 20, 4
    truth = rng.standard_normal((T, N))
    m = subset_masks(N, S, 0.5, seeds=range(S))
    losses = -truth @ m.T
    per = lds_per_target(rng.standard_normal((T, N)), m, losses)
    est = bootstrap_ci(per, num_boot=500)
    assert abs(est.mean) < 0.1
    assert est.low < 0 < est.high


def test_bootstrap_interval_holds_the_estimate():
    values = np.random.default_rng(3).normal(0.3, 0.2, size=50)
    est = bootstrap_ci(np.r_[values, np.nan], num_boot=300, seed=1)
    assert est.n == 50
    assert est.low <= est.mean <= est.high
    assert est.mean == pytest.approx(values.mean())
    assert est.high - est.low < 0.2


def test_trak_scores_match_the_feature_space_formula():
    rng = np.random.default_rng(4)
    phi, q, lam = rng.standard_normal((6, 9)), rng.standard_normal((3, 9)), 0.7
    direct = q @ np.linalg.solve(phi.T @ phi + lam * np.eye(9), phi.T)  # (ΦᵀΦ + λI)⁻¹ in R^D
    np.testing.assert_allclose(trak_scores(phi, q, lam), direct, atol=1e-10)
