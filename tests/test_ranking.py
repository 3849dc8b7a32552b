"""ranking.py: the row-wise Spearman against scipy, row by row."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import spearmanr

from gradindex.errors import DataError
from gradindex.ranking import spearman_rows


def test_spearman_rows_equals_scipy_row_by_row_with_ties():
    rng = np.random.default_rng(3)
    a = rng.integers(0, 5, (6, 11)).astype(float)  # many ties
    b = a + rng.normal(0, 2, a.shape)
    got = spearman_rows(a, b)
    want = [spearmanr(x, y).statistic for x, y in zip(a, b, strict=True)]
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert spearman_rows([1, 2, 3], [30, 20, 10]).tolist() == [-1.0]  # 1-D: one row
    assert np.isnan(spearman_rows([[1, 1, 1]], [[1, 2, 3]])[0])  # a constant row
    with pytest.raises(DataError, match="shapes differ"):
        spearman_rows(np.zeros((2, 3)), np.zeros((3, 2)))


def test_scores_closer_than_float16_can_tell_keep_their_order():
    """Attribution scores differ in the 5th digit (and reach 1e5): ranked as given, in float64."""
    a = [[1.0, 1.0001, 1.0002, 1.0003], [1e5, 2e5, 3e5, 4e5]]
    b = [[4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0]]
    assert spearman_rows(a, b).tolist() == [-1.0, 1.0]
