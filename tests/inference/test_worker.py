"""The worker's parts without Kafka: admission scheduling, the per-partition ledger, sketch
policy, metrics, and the serving backend on the tiny test base model."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import generate_latest
from random_adapters import write_random_adapters
from typer.testing import CliRunner

from inference.adapter_cache import AdapterStatus
from inference.adapter_store import AdapterStore
from inference.base_model import build_base_model
from inference.config import ModelConfig
from inference.hashing import base_model_hash
from inference.sketch import Sketcher
from inference.worker.backend import BackendConfig, ServingBackend
from inference.worker.metrics import WorkerMetrics
from inference.worker.partition_backlog import PartitionBacklog
from inference.worker.scheduler import AdmissionScheduler, Residency
from inference.worker.service import transactional_id
from inference.worker.sketching import SketchMode, SketchPolicy
from infra.kafka.events import Outgoing
from infra.settings import load_settings
from schemas.events import ErrorCode, InferenceRequest, InferenceResult

# --- scheduler -------------------------------------------------------------------------------


def _residency(table: dict[str, Residency]):
    return lambda adapter_id: table.get(adapter_id, Residency.COLD)


def test_ready_adapters_go_first_at_equal_age():
    scheduler: AdmissionScheduler[str] = AdmissionScheduler(ready_bonus_s=0.5, host_bonus_s=0.2)
    scheduler.push("cold", "c", now=0.0)
    scheduler.push("host", "h", now=0.0)
    scheduler.push("hot", "d", now=0.0)
    table = {"d": Residency.READY, "h": Residency.HOST}
    assert scheduler.take(3, _residency(table), now=0.1) == ["hot", "host", "cold"]
    assert len(scheduler) == 0


def test_within_one_residency_the_oldest_goes_first():
    scheduler: AdmissionScheduler[int] = AdmissionScheduler()
    for number in range(5):
        scheduler.push(number, f"a{number}", now=float(number))
    assert scheduler.take(2, _residency({}), now=10.0) == [0, 1]
    assert scheduler.take(10, _residency({}), now=10.0) == [2, 3, 4]


def test_a_cold_request_overtakes_hot_ones_once_old_enough():
    scheduler: AdmissionScheduler[str] = AdmissionScheduler(ready_bonus_s=0.5, host_bonus_s=0.0)
    table = {"hot": Residency.READY}
    scheduler.push("cold-0", "cold", now=0.0)
    scheduler.push("hot-0.2", "hot", now=0.2)
    scheduler.push("hot-0.6", "hot", now=0.6)
    # hot-0.2 arrived within the bonus after cold-0, so it may go first; hot-0.6 may not.
    assert scheduler.take(1, _residency(table), now=1.0) == ["hot-0.2"]
    assert scheduler.take(1, _residency(table), now=1.0) == ["cold-0"]
    assert scheduler.take(1, _residency(table), now=1.0) == ["hot-0.6"]


@settings(max_examples=60, deadline=None)
@given(
    arrivals=st.lists(
        st.tuples(st.floats(0, 5, allow_nan=False), st.sampled_from(["a", "b", "c", "d"])),
        min_size=1,
        max_size=30,
    ),
    hot=st.sets(st.sampled_from(["a", "b", "c", "d"])),
    batch=st.integers(1, 4),
)
def test_no_request_is_overtaken_by_one_that_arrived_more_than_the_bonus_later(
    arrivals, hot, batch
):
    bonus = 0.5
    scheduler: AdmissionScheduler[tuple[float, str]] = AdmissionScheduler(bonus, 0.0)
    for at, adapter in sorted(arrivals):
        scheduler.push((at, adapter), adapter, now=at)
    table = {adapter: Residency.READY for adapter in hot}
    order: list[tuple[float, str]] = []
    now = 5.0
    while len(scheduler):
        order.extend(scheduler.take(batch, _residency(table), now=now))
        now += 0.1
    assert sorted(order) == sorted(arrivals)
    for position, (at, _) in enumerate(order):
        for later_at, _ in order[position + 1 :]:
            assert not later_at < at - bonus - 1e-9, "an old request overtook a much older one"


def test_upcoming_adapters_are_distinct_and_oldest_first():
    scheduler: AdmissionScheduler[int] = AdmissionScheduler()
    for number, adapter in enumerate(["x", "y", "x", "z", None, "w"]):
        scheduler.push(number, adapter, now=float(number))
    assert scheduler.upcoming_adapters(3) == ["x", "y", "z"]
    assert scheduler.remove(lambda item: item % 2 == 0) == [0, 2, 4]
    assert list(scheduler) == [1, 3, 5]


def test_bonuses_must_be_ordered():
    with pytest.raises(ValueError, match="ready_bonus_s >= host_bonus_s"):
        AdmissionScheduler(ready_bonus_s=0.1, host_bonus_s=0.2)


# --- ledger ----------------------------------------------------------------------------------


def _message(request_id: str) -> list[Outgoing]:
    result = InferenceResult(
        request_id=request_id, adapter_id="a", status="error", worker_id="w",
        error_code=ErrorCode.UNKNOWN_ADAPTER,
    )
    return [Outgoing.of(result)]


def test_only_the_finished_prefix_is_ready():
    ledger = PartitionBacklog()
    for offset, key in [(10, "a"), (11, "b"), (13, "c")]:
        assert ledger.track(offset, key) is not None
    assert ledger.ready() is None
    assert ledger.finish("b", _message("b"))
    assert ledger.ready() is None, "b finished, but a before it did not"
    assert ledger.finish("a", _message("a"))
    prefix = ledger.ready()
    assert prefix is not None
    assert [entry.key for entry in prefix.entries] == ["a", "b"]
    assert prefix.next_offset == 12
    assert [m.event.request_id for m in prefix.messages] == ["a", "b"]
    ledger.confirm(prefix)
    assert len(ledger) == 1 and ledger.unfinished == 1
    assert ledger.finish("c", [])
    last = ledger.ready()
    assert last is not None and last.next_offset == 14 and last.messages == []


def test_the_ledger_ignores_offsets_it_has_passed_and_unknown_keys():
    ledger = PartitionBacklog()
    ledger.track(5, "a")
    assert ledger.track(5, "again") is None
    assert ledger.track(3, "older") is None
    assert not ledger.finish("nobody", _message("x"))
    assert ledger.finish("a", _message("a"))
    assert not ledger.finish("a", _message("twice"))
    prefix = ledger.ready()
    ledger.confirm(prefix)
    with pytest.raises(RuntimeError, match="out of order"):
        ledger.confirm(prefix)


# --- sketch policy, ids ----------------------------------------------------------------------


def test_sketch_policy_modes():
    assert SketchPolicy(SketchMode.ALWAYS).wants("r1")
    assert not SketchPolicy(SketchMode.OFF).wants("r1")
    sampled = SketchPolicy(SketchMode.SAMPLED, 0.3)
    ids = [f"req-{i}" for i in range(4000)]
    chosen = [i for i in ids if sampled.wants(i)]
    assert 0.26 < len(chosen) / len(ids) < 0.34
    assert chosen == [i for i in ids if SketchPolicy(SketchMode.SAMPLED, 0.3).wants(i)]
    assert not any(SketchPolicy(SketchMode.SAMPLED, 0.0).wants(i) for i in ids[:100])
    with pytest.raises(ValueError, match="sketch rate"):
        SketchPolicy(SketchMode.SAMPLED, 1.5)


def test_transactional_ids_name_the_partition_not_the_worker():
    from aiokafka import TopicPartition

    settings_a = load_settings({"LORALEDGER_TOPIC_PREFIX": "p.", "LORALEDGER_WORKER_ID": "a"})
    settings_b = load_settings({"LORALEDGER_TOPIC_PREFIX": "p.", "LORALEDGER_WORKER_ID": "b"})
    tp = TopicPartition("p.requests", 3)
    assert transactional_id(settings_a, tp) == transactional_id(settings_b, tp)
    assert transactional_id(settings_a, tp) != transactional_id(
        settings_a, TopicPartition("p.requests", 4)
    )



class _RebalancingConsumer:
    """Stands in for aiokafka's consumer in one call of `Worker._fetch`: a rebalance runs inside
    `getmany` (aiokafka calls the listener there) and `getmany` then returns the first records
    of the new assignment, which moved the position past them."""

    def __init__(self, worker, tp, records: list, committed: int) -> None:
        self.worker, self.tp, self.records, self.committed_offset = worker, tp, records, committed
        self.seeks: list[tuple] = []

    async def getmany(self, timeout_ms: int, max_records: int) -> dict:
        self.worker._epoch += 2  # revoked, then assigned again
        self.worker._ledgers = {self.tp: PartitionBacklog()}
        return {self.tp: self.records}

    def assignment(self) -> set:
        return {self.tp}

    async def committed(self, tp) -> int:
        return self.committed_offset

    def seek(self, tp, offset: int) -> None:
        self.seeks.append((tp, offset))


def test_records_read_across_a_rebalance_are_read_again_from_the_committed_offset(tmp_path):
    import asyncio
    from types import SimpleNamespace

    from aiokafka import TopicPartition

    from inference.worker.service import Worker, WorkerConfig

    settings = load_settings({"LORALEDGER_HOME": str(tmp_path)})
    worker = Worker(settings, WorkerConfig("w-fetch"))
    worker.backend = SimpleNamespace(idle=lambda: True)
    tp = TopicPartition("requests", 2)
    records = [SimpleNamespace(offset=offset) for offset in (217, 218, 219)]
    consumer = _RebalancingConsumer(worker, tp, records, committed=217)
    asyncio.run(worker._fetch(consumer))
    # Nothing of the batch is taken, and the position goes back to where the group says the
    # partition starts: offsets 217-219 are served, not skipped by the next fetch.
    assert len(worker._ledgers[tp]) == 0
    assert consumer.seeks == [(tp, 217)]

def test_metrics_count_committed_results():
    from schemas.events import Timings, Usage

    metrics = WorkerMetrics()
    ok = InferenceResult(
        request_id="r1", adapter_id="a", status="ok", worker_id="w",
        usage=Usage(prompt_tokens=5, completion_tokens=3), cache_tier="device",
        timings=Timings(queue_ms=1, adapter_load_ms=0, prefill_ms=2, decode_ms=3, total_ms=6),
    )
    bad = InferenceResult(
        request_id="r2", adapter_id="a", status="error", worker_id="w",
        error_code=ErrorCode.UNKNOWN_ADAPTER,
    )
    metrics.observe_committed(ok, 0.01)
    metrics.observe_committed(bad, 0.02)
    metrics.observe_step(running=4, batch_size=8, queued=2)
    text = generate_latest(metrics.registry).decode()
    assert 'loraledger_worker_requests_total{error_code="",status="ok"} 1.0' in text
    assert 'error_code="unknown_adapter",status="error"} 1.0' in text
    assert 'loraledger_worker_tokens_total{kind="completion"} 3.0' in text
    assert 'loraledger_worker_adapter_cache_hits_total{tier="device"} 1.0' in text
    assert "loraledger_worker_batch_occupancy_count 1.0" in text
    line = metrics.status_line("w", [0, 1], pending=2)
    assert "results=2" in line and "device-hit=100%" in line and "\n" not in line


def test_the_cli_refuses_an_unknown_sketch_mode():
    from loraledger.cli import app

    result = CliRunner().invoke(app, ["worker", "--sketch", "sometimes"])
    assert result.exit_code != 0
    assert "unknown sketch mode" in result.output


# --- the backend on the tiny model -------------------------------------------------------------


@pytest.fixture(scope="module")
def base_model_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("base") / "base-model"
    build_base_model(directory, load_settings().cache_dir, "test")
    return directory


@pytest.fixture(scope="module")
def adapters_dir(base_model_dir, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("adapters")
    config = ModelConfig.from_model_dir(base_model_dir)
    write_random_adapters(directory, [f"ad{i}" for i in range(6)], config, indexed=["ad0", "ad1"])
    return directory


def _backend(base_model_dir, adapters_dir, policy: SketchPolicy, max_batch: int = 4):
    torch.set_num_threads(1)
    return ServingBackend.build(
        base_model_dir, adapters_dir, worker_id="w-test",
        config=BackendConfig(max_batch=max_batch, max_seq_len=128), sketch_policy=policy,
    )


def _requests() -> list[InferenceRequest]:
    good = [
        InferenceRequest(adapter_id=f"ad{i % 6}", prompt=f"the price of item {i} is",
                         max_new_tokens=4 + i % 3, seed=i)
        for i in range(18)
    ]
    bad = [
        InferenceRequest(adapter_id="no-such-adapter", prompt="hello", max_new_tokens=4),
        InferenceRequest(adapter_id="ad2", prompt="many words " * 200, max_new_tokens=4),
    ]
    return good + bad


def test_every_request_yields_exactly_one_result(base_model_dir, adapters_dir):
    backend = _backend(base_model_dir, adapters_dir, SketchPolicy(SketchMode.ALWAYS))
    requests = _requests()
    keys = {backend.enqueue(request): request for request in requests}
    completed = backend.run_until_idle()
    backend.close()
    assert sorted(c.key for c in completed) == sorted(keys)
    assert backend.idle()
    by_request = {c.result.request_id: c.result for c in completed}
    assert by_request["" + requests[-2].request_id].error_code is ErrorCode.UNKNOWN_ADAPTER
    assert by_request[requests[-1].request_id].error_code is ErrorCode.PROMPT_TOO_LONG
    base_hash = base_model_hash(base_model_dir)
    for request in requests[:-2]:
        result = by_request[request.request_id]
        assert result.status == "ok", result.error_message
        stored = AdapterStore(adapters_dir).adapter_dir(request.adapter_id)
        assert result.adapter_hash == stored.adapter_hash()
        assert result.base_model_hash == base_hash
        assert result.worker_id == "w-test"
        assert 1 <= result.usage.completion_tokens <= request.max_new_tokens
        assert result.usage.prompt_tokens == len(result.prompt_token_ids)
        assert result.timings is not None and result.timings.total_ms > 0
        assert result.cache_tier.value in ("device", "host", "disk")
        # Only adapters with an attribution index get a sketch.
        assert (result.sketch is not None) == (request.adapter_id in ("ad0", "ad1")
                                               and bool(result.output_text))


def test_a_request_without_an_adapter_is_served_by_the_base_model_alone(
    base_model_dir, adapters_dir
):
    base = InferenceRequest(prompt="the price of the clay pot is", max_new_tokens=6)
    alone = _backend(base_model_dir, adapters_dir, SketchPolicy(SketchMode.ALWAYS))
    alone.enqueue(base)
    (expected,) = [c.result for c in alone.run_until_idle()]
    alone.close()
    mixed = _backend(base_model_dir, adapters_dir, SketchPolicy(SketchMode.ALWAYS))
    others = _requests()[:3]  # of adapters ad0 and ad1, which have an index, and ad2
    for request in [*others, base]:
        mixed.enqueue(request)
    results = {c.result.request_id: c.result for c in mixed.run_until_idle()}
    mixed.close()
    result = results[base.request_id]
    assert result.status == "ok" and result.adapter_id is None
    assert result.output_token_ids == expected.output_token_ids != []
    assert (result.adapter_hash, result.sketch) == (None, None)
    assert result.base_model_hash == base_model_hash(base_model_dir)
    assert results[others[0].request_id].sketch is not None


def test_sketches_match_a_direct_computation(base_model_dir, adapters_dir):
    backend = _backend(base_model_dir, adapters_dir, SketchPolicy(SketchMode.ALWAYS))
    requests = [r for r in _requests() if r.adapter_id == "ad1"]
    for request in requests:
        backend.enqueue(request)
    results = [c.result for c in backend.run_until_idle()]
    backend.close()
    sketched = [r for r in results if r.sketch is not None]
    assert sketched
    sketcher = Sketcher(base_model_dir, adapters_dir / "ad1")
    expected = sketcher.projected_gradient([(r.prompt, r.output_text) for r in sketched])
    for result, row in zip(sketched, expected, strict=True):
        assert (result.sketch.k, result.sketch.seed) == (sketcher.k, sketcher.seed)
        np.testing.assert_allclose(result.sketch.to_array(), row, rtol=1e-4, atol=1e-6)


def test_sketch_modes_off_and_sampled(base_model_dir, adapters_dir):
    requests = [r for r in _requests() if r.adapter_id in ("ad0", "ad1")]
    off = _backend(base_model_dir, adapters_dir, SketchPolicy(SketchMode.OFF))
    for request in requests:
        off.enqueue(request)
    assert all(c.result.sketch is None for c in off.run_until_idle())
    off.close()
    policy = SketchPolicy(SketchMode.SAMPLED, 0.5)
    sampled = _backend(base_model_dir, adapters_dir, policy)
    for request in requests:
        sampled.enqueue(request)
    results = [c.result for c in sampled.run_until_idle()]
    sampled.close()
    assert {r.request_id for r in results if r.sketch is not None} == {
        r.request_id for r in results if policy.wants(r.request_id) and r.output_text
    }


def test_adapters_of_requests_the_scheduler_holds_load_while_others_decode(
    base_model_dir, adapters_dir
):
    backend = _backend(base_model_dir, adapters_dir, SketchPolicy(SketchMode.OFF), max_batch=1)
    requests = [r for r in _requests() if r.adapter_id in ("ad3", "ad4", "ad5")][:3]
    for request in requests:
        backend.enqueue(request)
    backend.advance(budget_s=0.0)  # the first runs; the other two stay in the scheduler
    assert len(backend.scheduler) == 2 and backend.engine.num_waiting == 0
    queued = [request.adapter_id for request in requests[1:]]
    deadline = time.monotonic() + 10
    while {backend.engine.adapter_status(a) for a in queued} & {
        AdapterStatus.ON_DISK,
        AdapterStatus.LOADING,
    }:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    results = [c.result for c in backend.run_until_idle()]
    backend.close()
    assert [r.status for r in results] == ["ok"] * 3
    tiers = {r.adapter_id: r.cache_tier.value for r in results}
    assert tiers[requests[0].adapter_id] == "disk"
    assert all(tiers[a] in ("host", "device") for a in queued)


def test_dropped_requests_yield_nothing(base_model_dir, adapters_dir):
    backend = _backend(base_model_dir, adapters_dir, SketchPolicy(SketchMode.OFF), max_batch=2)
    keys = [backend.enqueue(request) for request in _requests()[:8]]
    first = backend.advance(budget_s=0.0)  # admits two, steps once
    dropped = set(keys[:5])
    backend.drop(dropped)
    rest = backend.run_until_idle()
    backend.close()
    returned = {c.key for c in first + rest}
    assert returned >= set(keys[5:])
    assert not (returned - {c.key for c in first}) & dropped
    assert backend.idle()
