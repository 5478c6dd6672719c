"""The tiered adapter cache: statuses, rank-aware slots, LRU eviction that spares adapters in
use and pinned ones, prefetch, counters, and slots that never leak a previous adapter."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from inference.adapter_cache import AdapterCache, AdapterStatus, LatencyHistogram, NoFreeSlot
from inference.adapter_store import AdapterRefused, AdapterStore, UnknownAdapter
from inference.adapters import save_peft_adapter
from inference.config import LORA_TARGETS, LoraServingConfig, ModelConfig
from inference.lora_layers import FusedLoraParams, LoraPool
from inference.slot_plan import SlotBudgetTooSmall
from schemas.events import CacheTier

TINY = ModelConfig.from_preset("tiny")


def _write(store: Path, adapter_id: str, rank: int, targets=LORA_TARGETS, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    modules = {}
    for layer in range(TINY.num_layers):
        for target in targets:
            in_features, out_features = TINY.projection_shape(target)
            modules[(layer, target)] = (
                torch.randn(rank, in_features, generator=generator),
                torch.randn(out_features, rank, generator=generator),
            )
    save_peft_adapter(store / adapter_id, modules, lora_alpha=rank)


def _cache(store: Path, slots=(2, 1, 1, 1), **kwargs) -> AdapterCache:
    serving = LoraServingConfig(slots_per_class=slots, **kwargs)
    return AdapterCache(AdapterStore(store), TINY, serving)


def _wait_loaded(cache: AdapterCache, adapter_id: str) -> AdapterStatus:
    deadline = time.monotonic() + 10
    while cache.status(adapter_id) == AdapterStatus.LOADING and time.monotonic() < deadline:
        time.sleep(0.005)
    return cache.status(adapter_id)


def test_first_use_loads_from_disk_then_hits_the_device(tmp_path: Path) -> None:
    _write(tmp_path, "a8", 8)
    cache = _cache(tmp_path)
    assert cache.status("a8") == AdapterStatus.ON_DISK
    first = cache.acquire("a8")
    assert first.tier == CacheTier.DISK and cache.status("a8") == AdapterStatus.ON_DEVICE
    second = cache.acquire("a8")
    assert second.tier == CacheTier.DEVICE and second.slot == first.slot
    assert cache.refcount("a8") == 2
    stats = cache.stats()
    assert (stats["disk_misses"], stats["device_hits"], stats["device_hit_rate"]) == (1, 1, 0.5)
    assert stats["disk_loads"] == 1
    assert stats["disk_load_ms"]["count"] == 1 and stats["upload_ms"]["count"] == 1


def test_adapters_take_slots_of_their_rank_class(tmp_path: Path) -> None:
    for adapter_id, rank in [("r4", 4), ("r8", 8), ("r12", 12), ("r64", 64)]:
        _write(tmp_path, adapter_id, rank)
    cache = _cache(tmp_path)
    classes = {
        a: cache.pools[cache.acquire(a).slot.pool_index].rank_class
        for a in ("r4", "r8", "r12", "r64")
    }
    assert classes == {"r4": 8, "r8": 8, "r12": 16, "r64": 64}


def test_rank_above_the_largest_class_is_refused(tmp_path: Path) -> None:
    _write(tmp_path, "r32", 32)
    cache = _cache(tmp_path, slots=(1, 1), rank_classes=(8, 16))
    with pytest.raises(AdapterRefused, match="rank 32"):
        cache.acquire("r32")
    assert cache.status("r32") == AdapterStatus.FAILED


def test_eviction_is_lru_and_spares_adapters_in_use(tmp_path: Path) -> None:
    for name in ("a", "b", "c"):
        _write(tmp_path, name, 8)
    cache = _cache(tmp_path, slots=(2, 1, 1, 1))
    cache.acquire("a")
    cache.acquire("b")
    cache.release("b")  # b is idle but more recent than a; a stays in use
    cache.acquire("c")
    assert cache.status("a") == AdapterStatus.ON_DEVICE
    assert cache.status("b") == AdapterStatus.IN_HOST  # evicted from the device only
    cache.release("a")
    cache.acquire("b")  # now a is the least recently used idle adapter
    assert cache.status("a") == AdapterStatus.IN_HOST
    with pytest.raises(NoFreeSlot, match="rank-8 device slots hold adapters in use"):
        cache.acquire("a")
    assert cache.stats()["device_evictions"] == 2


def test_eviction_picks_the_least_recently_used_idle_adapter(tmp_path: Path) -> None:
    for name in ("a", "b", "c"):
        _write(tmp_path, name, 8)
    cache = _cache(tmp_path, slots=(2, 1, 1, 1))
    for name in ("a", "b", "a"):  # a was used last
        cache.acquire(name)
        cache.release(name)
    cache.acquire("c")
    assert cache.status("a") == AdapterStatus.ON_DEVICE
    assert cache.status("b") == AdapterStatus.IN_HOST


def test_pinned_adapters_stay_on_the_device(tmp_path: Path) -> None:
    for name in ("p", "q"):
        _write(tmp_path, name, 8)
    cache = _cache(tmp_path, slots=(1, 1, 1, 1))
    cache.pin("p")
    assert cache.refcount("p") == 0
    with pytest.raises(NoFreeSlot):
        cache.acquire("q")
    cache.unpin("p")
    cache.acquire("q")
    assert cache.status("p") == AdapterStatus.IN_HOST


def test_prefetch_loads_in_the_background_into_free_slots_only(tmp_path: Path) -> None:
    for name in ("x", "y"):
        _write(tmp_path, name, 8)
    cache = _cache(tmp_path, slots=(1, 1, 1, 1))
    cache.prefetch(["x", "nope", "../bad"])  # unknown and invalid ids are left to acquire
    assert _wait_loaded(cache, "x") == AdapterStatus.IN_HOST
    cache.prefetch(["x"])  # host -> free device slot
    assert cache.status("x") == AdapterStatus.ON_DEVICE
    cache.prefetch(["y"])
    assert _wait_loaded(cache, "y") == AdapterStatus.IN_HOST
    cache.prefetch(["y"])  # the only slot is taken: prefetch never evicts
    assert cache.status("x") == AdapterStatus.ON_DEVICE
    assert cache.status("y") == AdapterStatus.IN_HOST
    assert cache.acquire("y").tier == CacheTier.HOST
    assert cache.status("nope") == AdapterStatus.UNKNOWN


def test_load_and_unload_are_safe_twice(tmp_path: Path) -> None:
    _write(tmp_path, "a", 8)
    cache = _cache(tmp_path)
    assert cache.load("a") is cache.load("a")
    cache.acquire("a")
    assert cache.unload("a") is False  # in use
    assert cache.status("a") == AdapterStatus.ON_DEVICE
    cache.release("a")
    cache.release("a")  # one release too many is harmless
    assert cache.unload("a") and cache.unload("a")
    assert cache.status("a") == AdapterStatus.ON_DISK
    assert cache.free_slots(0) == 2


def test_unknown_ids_and_ids_that_would_leave_the_store(tmp_path: Path) -> None:
    cache = _cache(tmp_path / "store")
    with pytest.raises(UnknownAdapter, match="no adapter 'ghost'"):
        cache.acquire("ghost")
    # Ids are validated where they enter (schemas.ids.AdapterId); one that slipped past still
    # cannot reach an adapter outside the store.
    _write(tmp_path / "outside", "x", 8)
    cache.prefetch(["../outside/x"])
    assert cache.status("../outside/x") == AdapterStatus.UNKNOWN
    with pytest.raises(UnknownAdapter, match="no adapter"):
        cache.acquire("../outside/x")
    assert cache.stats()["disk_loads"] == 0


def test_refused_adapter_is_retried_once_its_weights_change(tmp_path: Path) -> None:
    _write(tmp_path, "fixme", 8)
    weights = tmp_path / "fixme" / "adapter_model.safetensors"
    weights.write_bytes(b"garbage")
    cache = _cache(tmp_path)
    with pytest.raises(AdapterRefused, match="unreadable"):
        cache.acquire("fixme")
    assert cache.status("fixme") == AdapterStatus.FAILED
    with pytest.raises(AdapterRefused, match="unreadable"):
        cache.acquire("fixme")
    assert cache.stats()["failures"] == 1  # the failure is remembered, not re-read
    _write(tmp_path, "fixme", 8)
    assert cache.status("fixme") == AdapterStatus.ON_DISK
    assert cache.acquire("fixme").tier == CacheTier.DISK


def test_host_tier_keeps_a_byte_budget(tmp_path: Path) -> None:
    for name in ("h1", "h2", "h3"):
        _write(tmp_path, name, 8)
    one = _cache(tmp_path).load("h1").nbytes
    cache = _cache(tmp_path, host_budget_bytes=2 * one)
    for name in ("h1", "h2", "h3"):
        cache.load(name)
    assert [cache.status(n) for n in ("h1", "h2", "h3")] == [
        AdapterStatus.ON_DISK,
        AdapterStatus.IN_HOST,
        AdapterStatus.IN_HOST,
    ]
    assert cache.stats()["host_evictions"] == 1


@pytest.mark.parametrize("fuse", [True, False])
def test_reused_slot_holds_nothing_of_the_previous_adapter(tmp_path: Path, fuse: bool) -> None:
    _write(tmp_path, "wide", 8, seed=1)
    _write(tmp_path, "narrow", 4, targets=("q_proj", "v_proj"), seed=2)
    cache = _cache(tmp_path, slots=(1, 1, 1, 1), fuse_projections=fuse)
    slot = cache.acquire("wide").slot
    cache.release("wide")
    assert cache.acquire("narrow").slot == slot
    pool = cache.pools[slot.pool_index]
    for layer in pool.params:
        for params_list in layer.values():
            for params in params_list:
                if isinstance(params, FusedLoraParams):
                    _assert_fused_slot_holds_narrow(params, slot.slot)
                    continue
                members = {target for target, _, _ in params.members}
                rank = int(params.ranks[slot.slot])
                # The host mirrors the CPU path reads instead of the tensors stay in step.
                assert params.host_ranks == params.ranks.tolist()
                assert params.host_scales == params.scales.tolist()
                views = params.slot_views[slot.slot]
                if members & {"q_proj", "v_proj"}:
                    assert rank == 4 * len(members & {"q_proj", "v_proj"})
                    assert not params.a[slot.slot, rank:].any()
                    assert views is not None and torch.equal(views[0], params.a[slot.slot, :rank])
                    assert torch.equal(views[1], params.b[slot.slot, :, :rank].t())
                else:
                    assert rank == 0 and params.users == 0 and views is None
                    assert not params.a[slot.slot].any() and not params.b[slot.slot].any()


def _assert_fused_slot_holds_narrow(params: FusedLoraParams, slot: int) -> None:
    """Rank 4 on q and v, nothing elsewhere: every row and column beyond is zero again."""
    ranks = params.member_ranks[slot]
    assert ranks == tuple(4 if t in ("q_proj", "v_proj") else 0 for t, _, _ in params.members)
    assert params.users == (1 if any(ranks) else 0)
    rank_class = params.rank_class
    for member, rank in enumerate(ranks):
        rows = params.a[slot, member * rank_class : (member + 1) * rank_class]
        assert bool(rows[:rank].any()) == (rank > 0) and not rows[rank:].any()
        assert bool(params.b[member][slot, :rank].any()) == (rank > 0)
        assert not params.b[member][slot, rank:].any()


def test_device_budget_sizes_the_pools(tmp_path: Path) -> None:
    per_slot = {
        rank: LoraPool.bytes_per_slot(TINY, rank, LORA_TARGETS, torch.float32, fuse=False)
        for rank in (8, 16)
    }
    budget = 3 * per_slot[8] + 2 * per_slot[16]
    cache = AdapterCache(
        AdapterStore(tmp_path),
        TINY,
        LoraServingConfig(
            rank_classes=(8, 16),
            device_budget_bytes=budget,
            class_shares=(3 * per_slot[8] / budget, 2 * per_slot[16] / budget),
            fuse_projections=False,
        ),
    )
    assert cache.stats()["slots"] == {8: 3, 16: 2}
    assert per_slot[16] == 2 * per_slot[8]
    # Fused slots hold the same weights: members' B are stored apart, without padding.
    assert LoraPool.bytes_per_slot(TINY, 8, LORA_TARGETS, torch.float32, fuse=True) == per_slot[8]
    with pytest.raises(SlotBudgetTooSmall, match="leaves rank class 8 without a slot"):
        AdapterCache(AdapterStore(tmp_path), TINY, LoraServingConfig(device_budget_bytes=10))


def test_latency_histogram_buckets_and_quantiles() -> None:
    histogram = LatencyHistogram()
    for ms in [0.2, 3, 3, 3, 40, 7000]:
        histogram.observe(ms)
    summary = histogram.as_dict()
    assert summary["count"] == 6
    assert summary["buckets"]["le_0.5ms"] == 1 and summary["buckets"]["le_5ms"] == 3
    assert summary["buckets"]["inf"] == 1
    assert histogram.quantile(0.5) == 3 and histogram.quantile(0.99) == 7000


def test_prefetched_adapters_count_as_hits_not_misses(tmp_path: Path) -> None:
    _write(tmp_path, "pre", 8)
    cache = _cache(tmp_path)
    cache.prefetch(["pre"])
    assert _wait_loaded(cache, "pre") == AdapterStatus.IN_HOST
    cache.prefetch(["pre"])  # to a free device slot
    assert cache.acquire("pre").tier == CacheTier.DEVICE
    stats = cache.stats()
    assert (stats["disk_loads"], stats["disk_misses"], stats["device_hits"]) == (1, 0, 1)
    assert stats["device_hit_rate"] == 1.0
