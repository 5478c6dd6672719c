"""Shares to integer parts per million that sum to exactly 1,000,000, and the minimum weight
below which a key is dropped.

The rounding is `pipeline.largest_remainder` over the floats' exact binary values, so no platform
rounding can move a unit between two keys, and ties go to the smaller key: the result is a pure
function of the input whatever order it comes in.
"""

from __future__ import annotations

from collections.abc import Mapping
from fractions import Fraction
from typing import TypeVar

from pipeline.largest_remainder import largest_remainder
from schemas.events import PPM_TOTAL

K = TypeVar("K", bound=tuple[str, ...])


def largest_remainder_ppm(shares: Mapping[K, float]) -> dict[K, int]:
    """Round non-negative `shares` (any positive total) to ppm summing to exactly PPM_TOTAL.
    Keys with a zero share get 0 ppm and are kept."""
    return largest_remainder(PPM_TOTAL, {key: Fraction(value) for key, value in shares.items()})

def apply_minimum(shares: Mapping[K, float], min_weight_ppm: int) -> dict[K, float]:
    """Drop keys whose share of the whole is below `min_weight_ppm`, repeating until every
    kept key clears it (dropping one raises the others). The largest key is always kept, so
    a non-empty input never comes back empty."""
    kept = {key: value for key, value in shares.items() if value > 0}
    if min_weight_ppm <= 0 or not kept:
        return kept
    while True:
        total = sum(kept.values())
        below = [key for key, value in kept.items() if value * PPM_TOTAL < min_weight_ppm * total]
        if not below:
            return kept
        if len(below) == len(kept):
            best = min(kept, key=lambda key: (-kept[key], key))
            return {best: kept[best]}
        for key in below:
            del kept[key]
