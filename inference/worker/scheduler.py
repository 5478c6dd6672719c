"""Which queued requests enter the engine's batch next.

A request's priority is its age plus a bonus for how ready its adapter is: an adapter already
in a device slot costs nothing to run, one in host memory costs an upload, one on disk a read.
Preferring ready adapters keeps the batch full and the cache warm; the bonus is a fixed number
of seconds, so a request is never overtaken by a request that arrived more than
`ready_bonus_s` after it. A cold adapter therefore waits at most that long behind hot traffic
(plus the time the requests ahead of it take), never forever.

The scheduler only ranks: how ready an adapter is comes from the caller (the engine's view of
its cache), and the caller hands `upcoming_adapters` to the engine to prefetch.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Generic, TypeVar

from schemas.ids import AdapterId

T = TypeVar("T")


class Residency(IntEnum):
    """How soon a request's adapter can run; lower is sooner."""

    READY = 0  # on a device slot, or no adapter work at all (base model, or a request that fails)
    HOST = 1  # in host memory or being read: an upload away
    COLD = 2  # on disk, not yet asked for


@dataclass(order=True)
class _Queued(Generic[T]):
    enqueued_at: float
    sequence: int
    item: T = field(compare=False)
    adapter_id: AdapterId | None = field(compare=False)


class AdmissionScheduler(Generic[T]):
    """A queue of requests ordered by age plus adapter readiness."""

    def __init__(self, ready_bonus_s: float = 0.25, host_bonus_s: float = 0.1) -> None:
        if not ready_bonus_s >= host_bonus_s >= 0.0:
            raise ValueError("bonuses must satisfy ready_bonus_s >= host_bonus_s >= 0")
        self.bonus_s = {
            Residency.READY: ready_bonus_s,
            Residency.HOST: host_bonus_s,
            Residency.COLD: 0.0,
        }
        self._queue: list[_Queued[T]] = []
        self._sequence = 0

    def __len__(self) -> int:
        return len(self._queue)

    def __iter__(self) -> Iterator[T]:
        return (queued.item for queued in self._queue)

    def push(self, item: T, adapter_id: AdapterId | None, now: float) -> None:
        self._sequence += 1
        self._queue.append(_Queued(now, self._sequence, item, adapter_id))

    def take(
        self, count: int, residency: Callable[[AdapterId | None], Residency], now: float
    ) -> list[T]:
        """Remove and return up to `count` items, highest priority first (oldest first among
        equals). `residency` is asked once per distinct adapter."""
        if count <= 0 or not self._queue:
            return []
        known: dict[AdapterId | None, Residency] = {}

        def priority(queued: _Queued[T]) -> tuple[float, float, int]:
            if queued.adapter_id not in known:
                known[queued.adapter_id] = residency(queued.adapter_id)
            age = now - queued.enqueued_at
            score = age + self.bonus_s[known[queued.adapter_id]]
            return (-score, queued.enqueued_at, queued.sequence)

        chosen = heapq.nsmallest(count, self._queue, key=priority)
        picked = {id(queued) for queued in chosen}
        self._queue = [queued for queued in self._queue if id(queued) not in picked]
        return [queued.item for queued in chosen]

    def upcoming_adapters(self, limit: int) -> list[AdapterId]:
        """Distinct adapters of the oldest queued requests, for prefetching."""
        adapters: dict[AdapterId, None] = {}
        for queued in sorted(self._queue):
            if queued.adapter_id is not None:
                adapters.setdefault(queued.adapter_id)
                if len(adapters) >= limit:
                    break
        return list(adapters)

    def remove(self, predicate: Callable[[T], bool]) -> list[T]:
        """Remove and return the items for which `predicate` holds."""
        removed = [queued.item for queued in self._queue if predicate(queued.item)]
        if removed:
            self._queue = [queued for queued in self._queue if not predicate(queued.item)]
        return removed
