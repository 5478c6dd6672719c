"""Shares to integer parts per million that sum to exactly 1,000,000.

Largest-remainder (Hamilton) rounding: every share gets the floor of its exact ppm, and the
units still missing go one each to the largest remainders. Ties go to the smaller key, so the
result is a pure function of the input whatever order it comes in.
"""

from __future__ import annotations

from collections.abc import Mapping
from fractions import Fraction
from typing import TypeVar

from schemas.events import PPM_TOTAL

K = TypeVar("K", bound=tuple[str, ...])


def largest_remainder_ppm(shares: Mapping[K, float]) -> dict[K, int]:
    """Round non-negative `shares` (any positive total) to ppm summing to exactly PPM_TOTAL.

    Arithmetic is exact (fractions of the floats' binary values), so no platform rounding can
    move a unit between two keys. Keys with a zero share get 0 ppm and are kept.
    """
    if not shares:
        raise ValueError("no shares to round: at least one key is needed")
    exact = {key: Fraction(value) for key, value in shares.items()}
    if any(value < 0 for value in exact.values()):
        raise ValueError("shares must be non-negative")
    total = sum(exact.values(), Fraction(0))
    if total <= 0:
        raise ValueError("shares sum to zero: nothing to normalize")
    scaled = {key: value * PPM_TOTAL / total for key, value in exact.items()}
    floors = {key: int(value) for key, value in scaled.items()}
    missing = PPM_TOTAL - sum(floors.values())
    by_remainder = sorted(scaled, key=lambda key: (-(scaled[key] - floors[key]), key))
    for key in by_remainder[:missing]:
        floors[key] += 1
    return floors


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
