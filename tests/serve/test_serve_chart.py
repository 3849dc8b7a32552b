"""serve/chart.py: the norm profile's SVG coordinates, worked by hand."""

from __future__ import annotations

import pytest

from gradindex.serve.chart import HEIGHT, PAD, WIDTH, profile_svg


def test_points_lie_on_a_linear_time_axis_and_a_log_norm_axis():
    profile = [
        {"t": 0, "row": 1.0, "median": 10.0},
        {"t": 500, "row": 100.0, "median": 10.0},
        {"t": 1000, "row": 10.0, "median": 10.0},
    ]
    svg = profile_svg(profile)
    left, right = PAD, WIDTH - PAD
    bottom, top = HEIGHT - PAD, PAD  # norms 1 .. 100: two decades
    assert svg["row_points"] == [
        (left, bottom),
        (pytest.approx((left + right) / 2), top),
        (right, pytest.approx((bottom + top) / 2)),
    ]
    assert svg["x_ticks"] == [(left, 0), (pytest.approx((left + right) / 2), 500), (right, 1000)]
    assert [label for _, label in svg["y_ticks"]] == ["1", "10", "100"]
    mid = f"{(left + right) / 2:.1f},{(bottom + top) / 2:.1f}"
    assert svg["median_line"].split()[1] == mid  # the median's 10 at mid height
    assert not svg["empty"]


def test_an_empty_or_all_zero_profile_draws_nothing_and_a_flat_one_gets_a_range():
    assert profile_svg([])["empty"]
    assert profile_svg([{"t": 1, "row": 0.0, "median": 0.0}])["empty"]
    flat = profile_svg([{"t": 5, "row": 2.0, "median": 2.0}])
    assert not flat["empty"]
    (x, y) = flat["row_points"][0]
    assert x == PAD and y == pytest.approx(HEIGHT / 2)  # one value: the middle of a decade
