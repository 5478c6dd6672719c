"""Largest-remainder (Hamilton) rounding: the one way a whole number of units is split in
proportion to weights, for fees (`pipeline.rewards`) and attribution ppm
(`pipeline.attribution.ppm`).

Every part is the floor of its exact share, and the units still missing go one each to the
largest remainders, ties to the smaller key, so the parts sum to the total exactly, each is
within one unit of its exact share, and the result does not depend on the order the weights
come in. Arithmetic is exact (ints or Fractions), so no platform rounding can move a unit.
"""

from __future__ import annotations

from collections.abc import Mapping
from fractions import Fraction
from typing import TypeVar

K = TypeVar("K")  # keys must sort among themselves: they break ties

Weight = int | Fraction


def largest_remainder(total: int, weights: Mapping[K, Weight]) -> dict[K, int]:
    """Split `total` units over `weights` (non-negative); a zero total over zero weights gives
    zeros, any other total over weights summing to zero is refused."""
    if total < 0:
        raise ValueError(f"cannot split a negative total {total}")
    if any(weight < 0 for weight in weights.values()):
        raise ValueError("weights must be non-negative")
    weight_sum = sum(weights.values(), Fraction(0))
    if weight_sum == 0:
        if total:
            raise ValueError(f"cannot split {total} over weights that sum to zero")
        return dict.fromkeys(weights, 0)
    parts = {key: int(total * weight // weight_sum) for key, weight in weights.items()}
    remainders = {key: total * weight % weight_sum for key, weight in weights.items()}
    leftover = total - sum(parts.values())
    for key in sorted(weights, key=lambda key: (-remainders[key], key))[:leftover]:
        parts[key] += 1
    return parts
