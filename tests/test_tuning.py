"""The tuning protocol: a coarse log grid first, and an honest word on where the best lr lies."""

from __future__ import annotations

import math

import pytest

from ribbed.config import SearchDimension
from ribbed.experiments.tuning import grid_values, lr_bracket


def test_grid_spans_the_range_evenly_in_log():
    values = grid_values(SearchDimension(low=1e-4, high=1e-1, log=True), 7)
    assert values[0] == 1e-4 and values[-1] == 1e-1  # exactly: optuna refuses a value outside the range
    ratios = [b / a for a, b in zip(values, values[1:], strict=False)]
    assert all(r == pytest.approx(math.sqrt(10)) for r in ratios)
    assert grid_values(SearchDimension(low=0.0, high=1.0), 3) == [0.0, 0.5, 1.0]


@pytest.mark.parametrize("tried, best, interior, resolution", [
    ([1e-3, 3e-3, 1e-2], 3e-3, True, 3.333),       # bracketed on both sides
    ([1e-3, 3e-3, 1e-2], 1e-2, False, 3.333),      # best at the top of what was tried: an edge
    ([1e-3, 3e-3, 1e-2], 1e-3, False, 3.0),
    ([2e-3, 2.5e-3, 3e-3], 2.5e-3, True, 1.25),
    ([5e-3], 5e-3, False, None),
])
def test_lr_bracket_says_whether_the_best_is_interior(tried, best, interior, resolution):
    bracket = lr_bracket(tried, best)
    assert bracket["lr"] == best and bracket["lr_interior"] is interior
    assert bracket["lr_resolution"] == resolution
