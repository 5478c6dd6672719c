"""How many device slots each rank class gets: the plan the adapter cache allocates.

The plan follows from the model's size. One slot of rank class r holds, for every decoder
layer and every targeted projection, A [r, in] and B [out, r] (wider when projections are
fused), so its bytes grow with the model. Without an explicit budget, the budget is the
larger of `DEFAULT_BUDGET_FLOOR` and what gives the largest rank class `MIN_DEFAULT_SLOTS`
slots (smaller classes, sharing the budget equally, get more), so adapters of every rank
class load on any supported checkpoint with default settings. An explicit budget that leaves
a rank class without a slot is refused with the bytes it would need, rather than the class
silently disappearing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from inference.config import LoraServingConfig, ModelConfig
from inference.lora_layers import LoraPool

DEFAULT_BUDGET_FLOOR = 64 << 20
MIN_DEFAULT_SLOTS = 2


class SlotBudgetTooSmall(ValueError):
    """The device budget leaves a rank class without a slot; the message names the bytes."""


@dataclass(frozen=True)
class RankClassPlan:
    rank: int
    slots: int
    bytes_per_slot: int

    @property
    def bytes(self) -> int:
        return self.slots * self.bytes_per_slot


@dataclass(frozen=True)
class SlotPlan:
    budget_bytes: int  # what the classes share (the sum of slot counts if they were given)
    budget_source: str  # "derived from the model", "configured" or "slot counts"
    classes: tuple[RankClassPlan, ...]

    @property
    def total_bytes(self) -> int:
        return sum(plan.bytes for plan in self.classes)

    @property
    def max_rank(self) -> int:
        return max(plan.rank for plan in self.classes if plan.slots > 0)


def plan_slots(
    model_config: ModelConfig, serving: LoraServingConfig, dtype: torch.dtype, fuse: bool
) -> SlotPlan:
    """The slots of every rank class of `serving` for this model, dtype and fusion."""
    per_slot = [
        LoraPool.bytes_per_slot(model_config, rank, serving.target_modules, dtype, fuse=fuse)
        for rank in serving.rank_classes
    ]
    if serving.slots_per_class is not None:
        slots = list(serving.slots_per_class)
        if not any(slots):
            raise SlotBudgetTooSmall("slots_per_class gives no rank class a slot")
        classes = _classes(serving, slots, per_slot)
        return SlotPlan(sum(plan.bytes for plan in classes), "slot counts", classes)
    shares = serving.class_shares or tuple(1.0 for _ in serving.rank_classes)
    if serving.device_budget_bytes is None:
        budget = max(DEFAULT_BUDGET_FLOOR, _budget_for(MIN_DEFAULT_SLOTS, per_slot, shares))
        source = "derived from the model"
    else:
        budget, source = serving.device_budget_bytes, "configured"
    slots = _split(budget, per_slot, shares)
    for rank, count, size in zip(serving.rank_classes, slots, per_slot, strict=True):
        if count == 0:
            fraction = shares[serving.rank_classes.index(rank)] / sum(shares)
            raise SlotBudgetTooSmall(
                f"a device budget of {budget} bytes leaves rank class {rank} without a slot "
                f"(one takes {size} bytes; the class gets {fraction:.0%} of the budget): set "
                f"the adapter memory to at least {_budget_for(1, per_slot, shares)} bytes, or "
                "leave it unset to size it from the model"
            )
    return SlotPlan(budget, source, _classes(serving, slots, per_slot))


def _classes(
    serving: LoraServingConfig, slots: list[int], per_slot: list[int]
) -> tuple[RankClassPlan, ...]:
    return tuple(
        RankClassPlan(rank, count, size)
        for rank, count, size in zip(serving.rank_classes, slots, per_slot, strict=True)
    )


def _split(budget: int, per_slot: list[int], shares: tuple[float, ...]) -> list[int]:
    total = sum(shares)
    return [
        int(budget * share / total) // size for size, share in zip(per_slot, shares, strict=True)
    ]


def _budget_for(min_slots: int, per_slot: list[int], shares: tuple[float, ...]) -> int:
    """The smallest budget (to float rounding) that gives every class `min_slots` slots."""
    total = sum(shares)
    budget = max(
        math.ceil(min_slots * size * total / share)
        for size, share in zip(per_slot, shares, strict=True)
    )
    while min(_split(budget, per_slot, shares)) < min_slots:
        budget += 1
    return budget

