"""The tiered adapter cache: device slots, host memory, disk store.

- Device: one `LoraPool` per rank class, sized by the slot plan (`inference.slot_plan`: a
  byte budget, by default derived from the model); an adapter takes a slot of the smallest
  class that holds its rank. Slots with sequences in flight (refcount > 0) or
  pinned adapters are never evicted; others go least-recently-used first.
- Host: validated weights, least-recently-used within a byte budget (page-locked on CUDA so
  uploads overlap compute).
- Disk: the `AdapterStore`, any number of adapters.

`acquire` loads just in time (disk -> host -> device) and counts a reference; `release` drops
it. `status` says which tier holds an adapter and `prefetch` starts disk reads on a background
thread and uploads to free slots, so the adapters queued requests need are ready when they are
admitted. All bookkeeping happens on the caller's thread; the loader threads only read and
validate files. The engine owns its cache: everything else asks the engine.

Every disk read has a deadline (`LoraServingConfig.load_timeout_s`): a read that outlives it
fails its adapter, and its thread, which Python cannot stop, is abandoned and replaced. Loader
threads are daemons and `close` never joins them, so a read stuck in the kernel delays neither
a request nor the process's exit.

Adapter ids arrive validated (`schemas.ids.AdapterId`); the store still refuses, as unknown,
any id that would name something outside its directory.
"""

from __future__ import annotations

import bisect
import queue
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, InvalidStateError, wait
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch

from inference.adapter_store import (
    AdapterError,
    AdapterRefused,
    AdapterStore,
    UnknownAdapter,
)
from inference.adapters import AdapterWeights, load_peft_adapter
from inference.config import LoraServingConfig, ModelConfig
from inference.lora_layers import LoraPool, SlotIndex
from inference.slot_plan import plan_slots
from schemas.events import CacheTier
from schemas.ids import AdapterId

_EXPIRE_POLL_S = 0.05


class AdapterStatus(Enum):
    ON_DISK = "on_disk"
    LOADING = "loading"
    IN_HOST = "in_host"
    ON_DEVICE = "on_device"
    FAILED = "failed"
    UNKNOWN = "unknown"  # not in the store


class NoFreeSlot(Exception):
    """Every device slot of the adapter's rank class holds an adapter in use; retry later."""


@dataclass(frozen=True)
class DeviceSlot:
    pool_index: int  # index into AdapterCache.pools
    slot: SlotIndex


@dataclass(frozen=True)
class Acquired:
    slot: DeviceSlot
    tier: CacheTier  # where the adapter was when it was asked for
    version: str  # the adapter hash, over its config and weights


class LatencyHistogram:
    """Millisecond latencies: cumulative-style bucket counts plus recent samples for quantiles."""

    BOUNDS_MS: tuple[float, ...] = (0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)

    def __init__(self, keep: int = 10_000) -> None:
        self.counts = [0] * (len(self.BOUNDS_MS) + 1)  # last bucket: above every bound
        self.samples: deque[float] = deque(maxlen=keep)

    def observe(self, ms: float) -> None:
        self.counts[bisect.bisect_left(self.BOUNDS_MS, ms)] += 1
        self.samples.append(ms)

    @property
    def count(self) -> int:
        return sum(self.counts)

    def quantile(self, q: float) -> float | None:
        if not self.samples:
            return None
        ordered = sorted(self.samples)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    def as_dict(self) -> dict[str, object]:
        labels = [f"le_{b:g}ms" for b in self.BOUNDS_MS] + ["inf"]
        return {
            "buckets": dict(zip(labels, self.counts, strict=True)),
            "count": self.count,
            "p50_ms": self.quantile(0.5),
            "p99_ms": self.quantile(0.99),
        }


@dataclass
class CacheCounters:
    # Where acquire found each adapter it was asked for (one count per acquire).
    device_hits: int = 0
    host_hits: int = 0
    disk_misses: int = 0  # not in memory (or still being read): the request waited on the disk
    # Disk reads completed, prefetches included.
    disk_loads: int = 0
    failures: int = 0
    device_evictions: int = 0
    host_evictions: int = 0
    disk_load_ms: LatencyHistogram = field(default_factory=LatencyHistogram)
    upload_ms: LatencyHistogram = field(default_factory=LatencyHistogram)

    @property
    def device_hit_rate(self) -> float | None:
        total = self.device_hits + self.host_hits + self.disk_misses
        return self.device_hits / total if total else None


@dataclass
class _Failure:
    error: AdapterError
    files_stamp: tuple[int, ...] | None  # (mtime, size) of the peft files when it failed


class LoadTimeout(TimeoutError):
    """A disk read outlived the load deadline and was abandoned."""


@dataclass(eq=False)
class _LoadJob:
    read: Callable[[], Any]
    future: Future[Any] = field(default_factory=Future)


class _Loader:
    """Daemon threads that run disk reads, each under a deadline that `expire` enforces: a late
    read's future fails with LoadTimeout and a fresh thread takes the stuck one's place, which
    exits whenever its read returns."""

    def __init__(self, workers: int, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._jobs: queue.SimpleQueue[_LoadJob | None] = queue.SimpleQueue()
        self._started: dict[_LoadJob, float] = {}  # running jobs -> monotonic start
        self._lock = threading.Lock()
        self._workers = workers
        for _ in range(workers):
            self._spawn()

    def submit(self, read: Callable[[], Any]) -> Future[Any]:
        job = _LoadJob(read)
        self._jobs.put(job)
        return job.future

    def expire(self) -> None:
        now = time.monotonic()
        with self._lock:
            late = [job for job, started in self._started.items() if now - started > self.timeout_s]
            for job in late:
                del self._started[job]
        for job in late:
            _settle(job.future, LoadTimeout(f"no result within {self.timeout_s:g} s"))
            self._spawn()

    def close(self) -> None:
        """Cancel queued reads and let the threads end; running reads are not waited for."""
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.future.cancel()
        for _ in range(self._workers):
            self._jobs.put(None)

    def _spawn(self) -> None:
        threading.Thread(target=self._serve, name="adapter-load", daemon=True).start()

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            if not job.future.set_running_or_notify_cancel():
                continue
            with self._lock:
                self._started[job] = time.monotonic()
            try:
                outcome: Any = job.read()
            except BaseException as exc:  # handed to the waiting side, as an executor does
                outcome = exc
            with self._lock:
                abandoned = self._started.pop(job, None) is None
            _settle(job.future, outcome)
            if abandoned:
                return  # expire() started this thread's replacement


def _settle(future: Future[Any], outcome: Any) -> None:
    """Set a future's result or exception unless it is already set (a read that returns just
    as it expires)."""
    try:
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)
    except InvalidStateError:
        pass


class AdapterCache:
    def __init__(
        self,
        store: AdapterStore,
        model_config: ModelConfig,
        serving: LoraServingConfig | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        base_model_hash: str | None = None,
    ) -> None:
        self.store = store
        self.model_config = model_config
        self.serving = serving or LoraServingConfig()
        self.dtype = dtype
        self.device = torch.device(device)
        self.base_model_hash = base_model_hash
        self.counters = CacheCounters()
        fuse = self.serving.fuse_projections
        self.fuse_projections = self.device.type == "cpu" if fuse is None else fuse
        self.plan = plan_slots(model_config, self.serving, dtype, self.fuse_projections)
        self.pools: list[LoraPool] = [
            LoraPool(
                model_config,
                rank_class.rank,
                rank_class.slots,
                self.serving.target_modules,
                dtype,
                self.device,
                fuse=self.fuse_projections,
            )
            for rank_class in self.plan.classes
            if rank_class.slots > 0
        ]
        self._free_slots: list[list[SlotIndex]] = [
            [SlotIndex(s) for s in range(pool.num_slots - 1, -1, -1)] for pool in self.pools
        ]
        self._on_device: OrderedDict[AdapterId, DeviceSlot] = OrderedDict()  # least recent first
        self._device_versions: dict[AdapterId, str] = {}
        self._in_host: OrderedDict[AdapterId, AdapterWeights] = OrderedDict()
        self._host_bytes = 0
        self._loading: dict[AdapterId, Future[tuple[AdapterWeights, float]]] = {}
        self._failed: dict[AdapterId, _Failure] = {}
        self._refcount: dict[AdapterId, int] = {}
        self._pinned: set[AdapterId] = set()
        self._loader = _Loader(self.serving.load_workers, self.serving.load_timeout_s)

    def _pool_for_rank(self, adapter_id: AdapterId, rank: int) -> int:
        for index, pool in enumerate(self.pools):
            if rank <= pool.rank_class:
                return index
        raise AdapterRefused(
            f"adapter {adapter_id!r} has rank {rank}; the largest device slot holds rank "
            f"{self.pools[-1].rank_class}"
        )

    # --- queries -----------------------------------------------------------------------------

    def status(self, adapter_id: AdapterId) -> AdapterStatus:
        self._harvest()
        if adapter_id in self._on_device:
            return AdapterStatus.ON_DEVICE
        if adapter_id in self._loading:
            return AdapterStatus.LOADING
        if adapter_id in self._in_host:
            return AdapterStatus.IN_HOST
        if adapter_id in self._failed and not self._failure_is_stale(adapter_id):
            return AdapterStatus.FAILED
        return AdapterStatus.ON_DISK if self.store.exists(adapter_id) else AdapterStatus.UNKNOWN

    def refcount(self, adapter_id: AdapterId) -> int:
        return self._refcount.get(adapter_id, 0)

    def free_slots(self, pool_index: int) -> int:
        return len(self._free_slots[pool_index])

    def stats(self) -> dict[str, object]:
        c = self.counters
        return {
            "device_hits": c.device_hits,
            "host_hits": c.host_hits,
            "disk_misses": c.disk_misses,
            "disk_loads": c.disk_loads,
            "failures": c.failures,
            "device_evictions": c.device_evictions,
            "host_evictions": c.host_evictions,
            "device_hit_rate": c.device_hit_rate,
            "disk_load_ms": c.disk_load_ms.as_dict(),
            "upload_ms": c.upload_ms.as_dict(),
            "on_device": len(self._on_device),
            "in_host": len(self._in_host),
            "host_bytes": self._host_bytes,
            "slots": {pool.rank_class: pool.num_slots for pool in self.pools},
        }

    # --- loading -----------------------------------------------------------------------------

    def prefetch(self, adapter_ids: Iterable[AdapterId]) -> None:
        """Start loading adapters that queued requests will need; never blocks, never raises.

        Disk reads run on the loader threads; adapters already in host memory go to a free
        device slot (no eviction, so the running batch keeps its adapters)."""
        self._harvest()
        for adapter_id in dict.fromkeys(adapter_ids):
            if adapter_id in self._on_device or adapter_id in self._loading:
                continue
            if adapter_id in self._in_host:
                self._upload_if_free(adapter_id)
                continue
            if not self.store.exists(adapter_id) or (
                adapter_id in self._failed and not self._failure_is_stale(adapter_id)
            ):
                continue
            self._start_load(adapter_id)

    def load(self, adapter_id: AdapterId) -> AdapterWeights:
        """Bring an adapter into host memory (blocking) and return it; loading twice is a no-op.

        Raises UnknownAdapter or AdapterRefused."""
        self._harvest()
        if adapter_id in self._in_host:
            self._in_host.move_to_end(adapter_id)
            return self._in_host[adapter_id]
        if adapter_id in self._failed and not self._failure_is_stale(adapter_id):
            raise self._failed[adapter_id].error
        if adapter_id not in self._loading:
            if not self.store.exists(adapter_id):
                raise UnknownAdapter(f"no adapter {adapter_id!r} in the adapter store")
            self._start_load(adapter_id)
        future = self._loading[adapter_id]
        while not future.done():  # the deadline is enforced here, by polling expire
            self._loader.expire()
            wait([future], timeout=_EXPIRE_POLL_S)
        self._harvest()
        if adapter_id in self._failed:
            raise self._failed[adapter_id].error
        return self._in_host[adapter_id]

    def acquire(self, adapter_id: AdapterId) -> Acquired:
        """A device slot for the adapter, loading it as needed; counts one reference.

        Raises UnknownAdapter, AdapterRefused, or NoFreeSlot (every slot of its rank class is
        in use: retry after some sequences finish)."""
        self._harvest()
        if adapter_id in self._on_device:
            self._on_device.move_to_end(adapter_id)
            tier = CacheTier.DEVICE
        else:
            tier = CacheTier.HOST if adapter_id in self._in_host else CacheTier.DISK
            weights = self.load(adapter_id)
            self._upload(adapter_id, weights, evict=True)
        # Counted once the adapter is placed: refusals and full slots are not lookups that
        # served a request (a request that waits for a slot asks again).
        if tier == CacheTier.DEVICE:
            self.counters.device_hits += 1
        elif tier == CacheTier.HOST:
            self.counters.host_hits += 1
        else:
            self.counters.disk_misses += 1
        self._refcount[adapter_id] = self._refcount.get(adapter_id, 0) + 1
        return Acquired(self._on_device[adapter_id], tier, self._device_versions[adapter_id])

    def release(self, adapter_id: AdapterId) -> None:
        """Drop one reference taken by acquire; releasing an unreferenced adapter does nothing."""
        count = self._refcount.get(adapter_id, 0)
        if count <= 1:
            self._refcount.pop(adapter_id, None)
        else:
            self._refcount[adapter_id] = count - 1

    def pin(self, adapter_id: AdapterId) -> None:
        """Keep the adapter on the device until unpinned (it is loaded now if needed)."""
        self.acquire(adapter_id)
        self._pinned.add(adapter_id)
        self.release(adapter_id)

    def unpin(self, adapter_id: AdapterId) -> None:
        self._pinned.discard(adapter_id)

    def unload(self, adapter_id: AdapterId) -> bool:
        """Forget the adapter in every memory tier (a later use re-reads the disk). Returns
        False, changing nothing, while sequences use it; unloading twice is harmless."""
        self._harvest()
        if self._refcount.get(adapter_id, 0) > 0:
            return False
        self._pinned.discard(adapter_id)
        self._failed.pop(adapter_id, None)
        if adapter_id in self._on_device:
            self._drop_from_device(adapter_id)
        weights = self._in_host.pop(adapter_id, None)
        if weights is not None:
            self._host_bytes -= weights.nbytes
        return True

    def close(self) -> None:
        self._loader.close()

    # --- internals ---------------------------------------------------------------------------

    def _read_and_validate(self, adapter_id: AdapterId) -> tuple[AdapterWeights, float]:
        """Runs on a loader thread: the weights and how long reading them took (seconds)."""
        started = time.perf_counter()
        weights = load_peft_adapter(
            self.store.adapter_dir(adapter_id).path,
            self.model_config,
            max_rank=self.pools[-1].rank_class,
            target_modules=self.serving.target_modules,
            adapter_id=adapter_id,
            base_model_hash=self.base_model_hash,
            dtype=self.dtype,
        )
        self._pool_for_rank(adapter_id, weights.rank)  # refuse ranks no slot can hold
        if self.device.type == "cuda":
            weights = weights.pin_memory()
        return weights, time.perf_counter() - started

    def _start_load(self, adapter_id: AdapterId) -> None:
        self._failed.pop(adapter_id, None)
        self._loading[adapter_id] = self._loader.submit(
            lambda: self._read_and_validate(adapter_id)
        )

    def _harvest(self) -> None:
        """Move finished loads into the host tier (or the failure table)."""
        self._loader.expire()
        for adapter_id in [a for a, f in self._loading.items() if f.done()]:
            future = self._loading.pop(adapter_id)
            error = future.exception()
            if error is None:
                weights, seconds = future.result()
                self.counters.disk_loads += 1
                self.counters.disk_load_ms.observe(seconds * 1000)
                self._put_host(adapter_id, weights)
            else:
                self.counters.failures += 1
                if isinstance(error, AdapterError):
                    refusal = error
                elif isinstance(error, LoadTimeout):
                    refusal = AdapterRefused(
                        f"adapter {adapter_id!r} did not load within "
                        f"{self._loader.timeout_s:g} s (slow or stuck storage); it is retried "
                        "once its files change"
                    )
                else:
                    refusal = AdapterRefused(f"adapter {adapter_id!r} failed to load: {error}")
                self._failed[adapter_id] = _Failure(refusal, self._files_stamp(adapter_id))

    def _put_host(self, adapter_id: AdapterId, weights: AdapterWeights) -> None:
        old = self._in_host.pop(adapter_id, None)
        if old is not None:
            self._host_bytes -= old.nbytes
        self._in_host[adapter_id] = weights
        self._host_bytes += weights.nbytes
        while self._host_bytes > self.serving.host_budget_bytes and len(self._in_host) > 1:
            _, evicted = self._in_host.popitem(last=False)
            self._host_bytes -= evicted.nbytes
            self.counters.host_evictions += 1

    def _upload_if_free(self, adapter_id: AdapterId) -> None:
        weights = self._in_host[adapter_id]
        try:
            pool_index = self._pool_for_rank(adapter_id, weights.rank)
        except AdapterRefused:
            return
        if self._free_slots[pool_index]:
            self._upload(adapter_id, weights, evict=False)

    def _upload(self, adapter_id: AdapterId, weights: AdapterWeights, *, evict: bool) -> None:
        pool_index = self._pool_for_rank(adapter_id, weights.rank)
        free = self._free_slots[pool_index]
        if not free and evict:
            victim = next(
                (
                    a
                    for a, s in self._on_device.items()
                    if s.pool_index == pool_index
                    and self._refcount.get(a, 0) == 0
                    and a not in self._pinned
                ),
                None,
            )
            if victim is not None:
                self._drop_from_device(victim)
                self.counters.device_evictions += 1
        if not free:
            pool = self.pools[pool_index]
            raise NoFreeSlot(
                f"all {pool.num_slots} rank-{pool.rank_class} device slots hold adapters in use"
            )
        started = time.perf_counter()
        slot = free.pop()
        self.pools[pool_index].write(slot, weights)
        self._on_device[adapter_id] = DeviceSlot(pool_index, slot)
        self._device_versions[adapter_id] = weights.version
        self.counters.upload_ms.observe((time.perf_counter() - started) * 1000)

    def _drop_from_device(self, adapter_id: AdapterId) -> None:
        placed = self._on_device.pop(adapter_id)
        self._device_versions.pop(adapter_id, None)
        self.pools[placed.pool_index].clear(placed.slot)
        self._free_slots[placed.pool_index].append(placed.slot)

    def _files_stamp(self, adapter_id: AdapterId) -> tuple[int, ...] | None:
        directory = self.store.adapter_dir(adapter_id)
        stamp: list[int] = []
        for path in (directory.config_path, directory.weights_path):
            try:
                info = path.stat()
            except OSError:
                return None
            stamp += [info.st_mtime_ns, info.st_size]
        return tuple(stamp)

    def _failure_is_stale(self, adapter_id: AdapterId) -> bool:
        """A refused adapter is retried once its config or weights file changes."""
        return self._failed[adapter_id].files_stamp != self._files_stamp(adapter_id)
