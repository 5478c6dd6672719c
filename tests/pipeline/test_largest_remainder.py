"""Largest-remainder rounding, shared by fee splits and attribution ppm: exact sums, every part
within one unit of its exact share, ties to the smaller key whatever the input order."""

from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.largest_remainder import largest_remainder


def test_leftover_goes_to_largest_remainders_then_smaller_keys():
    assert largest_remainder(10, {"c": 1, "a": 1, "b": 1}) == {"c": 3, "a": 4, "b": 3}
    assert largest_remainder(100, {"x": 333_333, "y": 333_333, "z": 333_334}) == {
        "x": 33, "y": 33, "z": 34}
    assert largest_remainder(0, {"a": 0, "b": 0}) == {"a": 0, "b": 0}


def test_fractions_are_split_exactly():
    # exact: 142857.14, 285714.28, 571428.57 -> the missing unit goes to .57
    sevenths = {"a": Fraction(1, 7), "b": Fraction(2, 7), "c": Fraction(4, 7)}
    assert largest_remainder(1_000_000, sevenths) == {"a": 142_857, "b": 285_714, "c": 571_429}


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="negative"):
        largest_remainder(-1, {"a": 1})
    with pytest.raises(ValueError, match="non-negative"):
        largest_remainder(1, {"a": 1, "b": -1})
    with pytest.raises(ValueError, match="sum to zero"):
        largest_remainder(5, {"a": 0, "b": 0})


@settings(max_examples=200, deadline=None)
@given(
    total=st.integers(min_value=0, max_value=10**12),
    weights=st.lists(st.integers(min_value=0, max_value=10**6), min_size=1, max_size=20),
)
def test_parts_sum_exactly_and_stay_within_one_unit(total, weights):
    if sum(weights) == 0:
        weights = [1, *weights[1:]]
    parts = largest_remainder(total, {f"k{i:03d}": w for i, w in enumerate(weights)})
    assert sum(parts.values()) == total
    for i, weight in enumerate(weights):
        assert abs(parts[f"k{i:03d}"] - Fraction(total * weight, sum(weights))) < 1


def test_the_result_does_not_depend_on_input_order():
    forward = largest_remainder(2, {"b": 1, "a": 1, "c": 1})
    backward = largest_remainder(2, {"c": 1, "a": 1, "b": 1})
    assert forward == backward == {"a": 1, "b": 1, "c": 0}
