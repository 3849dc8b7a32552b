"""inputs/ranges.py: the value-range rule on hand-picked pixel values."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from gradindex.errors import DataError
from gradindex.inputs.ranges import (
    check_given_range,
    query_range,
    range_of_bounds,
    resolve_data_range,
    value_bounds,
    within,
)


@pytest.mark.parametrize(
    "lo, hi, fallback, want",
    [
        (0.0, 1.0, None, (0.0, 1.0)),
        (-0.005, 1.009, None, (0.0, 1.0)),  # within 1% of the width either side
        (0.2, 0.7, None, (0.0, 1.0)),  # [0, 1] is tried first
        (-0.5, 0.3, None, (-1.0, 1.0)),
        (-1.02, 1.0, None, (-1.0, 1.0)),  # 1% of a width of 2
        (0.0, 200.0, (0, 255), (0.0, 255.0)),  # wider values inside the index's range
        (None, None, None, (0.0, 1.0)),  # no finite value
    ],
)
def test_range_of_bounds_follows_the_rule(lo, hi, fallback, want):
    assert range_of_bounds(lo, hi, fallback) == want


@pytest.mark.parametrize(
    "lo, hi, fallback",
    [
        (0.0, 1.5, None),
        (-1.5, 1.0, None),
        (0.0, 1.5, (0, 255)),  # narrower than [-1, 1]'s width: not clearly 0..255
        (0.0, 300.0, (0, 255)),
    ],
)
def test_ambiguous_or_unknown_ranges_are_refused(lo, hi, fallback):
    with pytest.raises(DataError, match="not \\[0, 1\\] or \\[-1, 1\\].*data_range"):
        range_of_bounds(lo, hi, fallback)


def test_resolve_data_range_by_dtype_and_values():
    assert resolve_data_range(np.zeros((2, 1, 2, 2), np.uint8) + 3) == (0.0, 255.0)
    x = np.array([[0.1, np.nan, 0.9]], np.float32)  # NaN does not count
    assert value_bounds(x) == (pytest.approx(0.1), pytest.approx(0.9))
    assert resolve_data_range(torch.tensor(x)) == (0.0, 1.0)
    assert resolve_data_range(np.array([-0.7, 0.2])) == (-1.0, 1.0)
    assert within(-0.01, 1.01, (0, 1)) and not within(-0.011, 1.0, (0, 1))


def test_a_given_range_applies_to_float_images_only():
    assert check_given_range(np.dtype(np.float32), (-2, 2)) == (-2.0, 2.0)
    assert check_given_range(np.dtype(np.uint8), (0, 255)) == (0.0, 255.0)
    with pytest.raises(DataError, match="uint8 .* given as \\[0, 1\\]"):
        check_given_range(np.dtype(np.uint8), (0, 1))


def test_query_images_are_ranged_one_by_one_and_a_mixed_batch_is_refused():
    a = np.full((1, 4), 0.5)  # [0, 1]
    b = np.array([[-0.5, 0.5, 0.1, 0.2]])  # [-1, 1]
    assert query_range(a) == (0.0, 1.0) and query_range(b) == (-1.0, 1.0)
    with pytest.raises(DataError, match=r"image 0 in \[0, 1\]; image 1 in \[-1, 1\]"):
        query_range(np.concatenate([a, b]))
    assert query_range(np.concatenate([b, b])) == (-1.0, 1.0)  # the same alone or together
    with pytest.raises(DataError, match="query image 1: pixel values span \\[0, 7\\]"):
        query_range(np.array([[0.1, 0.2], [0.0, 7.0]]))
    assert query_range(np.array([[np.nan, np.nan], [0.2, 0.3]])) == (0.0, 1.0)
    assert query_range(np.zeros((2, 2), np.uint8)) == (0.0, 255.0)
    assert query_range(a, given=(0, 2)) == (0.0, 2.0)


def test_a_query_in_zero_one_beside_a_minus_one_one_index_warns():
    with pytest.warns(UserWarning, match="read as \\[0, 1\\]"):
        assert query_range(np.full((1, 3), 0.5), fallback=(-1, 1)) == (0.0, 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        query_range(np.full((1, 3), 0.5), fallback=(0, 1))
