"""Exactly once under faults, against the real broker: workers run as subprocesses
(`python -m loraledger.cli worker`), are SIGKILLed mid-stream and restarted, and a second worker
joins and takes over; a read-committed consumer of `results` must see exactly one result per
request, none missing, bad requests as error results, and the undecodable message in
dead-letters."""

from __future__ import annotations

import asyncio
import base64
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from random_adapters import write_random_adapters

from inference.base_model import build_base_model
from inference.config import ModelConfig
from inference.hashing import base_model_hash
from infra.kafka.clients import make_producer
from infra.kafka.events import send_event
from infra.kafka.security import kafka_client_options
from infra.settings import Settings, load_settings
from schemas.codec import decode
from schemas.events import ErrorCode, InferenceRequest
from schemas.topics import TOPICS, topic_name

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
ADAPTERS = [f"adapter-{i:02d}" for i in range(40)]
INDEXED = ADAPTERS[:4]
GOOD_REQUESTS = 240
UNDECODABLE = b"\xff\xfe this is not an inference request"
DEADLINE_S = 150.0
TRICKLE_CHUNK = 5
TRICKLE_INTERVAL_S = 0.25


@pytest.fixture
def stack(stack_env, kafka_settings, tmp_path) -> tuple[dict[str, str], Settings]:
    """Environment of a worker subprocess: its own home, adapters and base model."""
    home = tmp_path / "home"
    base = tmp_path / "base-model"
    build_base_model(base, load_settings().cache_dir, "test")
    config = ModelConfig.from_model_dir(base)
    write_random_adapters(home / "adapters", ADAPTERS, config, indexed=INDEXED)
    env = {
        **stack_env,
        "LORALEDGER_HOME": str(home),
        "LORALEDGER_BASE_MODEL": str(base),
        "LORALEDGER_METRICS_PORT": "0",
        "PYTHONPATH": str(ROOT),
    }
    return env, load_settings(env)


def _requests() -> tuple[list[InferenceRequest], dict[str, ErrorCode]]:
    good = [
        InferenceRequest(
            adapter_id=ADAPTERS[(i * 7) % len(ADAPTERS)],
            prompt=f"order {i}: the price of the clay pot is",
            # Lengths vary, so completions overtake each other and a kill finds finished
            # requests beyond unfinished ones.
            max_new_tokens=8 + (i * 13) % 33,
            seed=i,
        )
        for i in range(GOOD_REQUESTS)
    ]
    unknown = [InferenceRequest(adapter_id=f"missing-{i}", prompt="hello") for i in range(3)]
    too_long = [
        InferenceRequest(adapter_id=ADAPTERS[i], prompt="a long prompt " * 300) for i in range(2)
    ]
    expected_errors = {r.request_id: ErrorCode.UNKNOWN_ADAPTER for r in unknown}
    expected_errors.update({r.request_id: ErrorCode.PROMPT_TOO_LONG for r in too_long})
    # Bad requests in the middle of the stream, not at its edges.
    requests = good[:100] + unknown + too_long + good[100:]
    return requests, expected_errors


async def _publish(
    settings: Settings,
    requests: list[InferenceRequest],
    chunk: int,
    undecodable_after: int | None = None,
) -> None:
    """Publish requests `chunk` at a time, a quarter second apart (chunk = all: one burst);
    the undecodable message goes out after `undecodable_after` requests."""
    producer = make_producer(settings)
    await producer.start()
    topic = topic_name("requests", settings.topic_prefix)
    try:
        for number, request in enumerate(requests, start=1):
            await send_event(producer, settings, request)
            if number == undecodable_after:
                await producer.send(topic, UNDECODABLE, key=b"adapter-00")
            if number % chunk == 0:
                await producer.flush()
                await asyncio.sleep(TRICKLE_INTERVAL_S)
        await producer.flush()
    finally:
        await producer.stop()


class Worker:
    def __init__(self, env: dict[str, str], worker_id: str, log_dir: Path) -> None:
        self.log = (log_dir / f"{worker_id}-{time.monotonic_ns()}.log").open("wb")
        self.process = subprocess.Popen(
            [
                sys.executable, "-m", "loraledger.cli", "worker",
                "--worker-id", worker_id, "--max-batch", "4", "--max-seq-len", "128",
                "--threads", "1", "--session-timeout-ms", "6000", "--log-level", "info",
            ],
            cwd=ROOT,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)
        self.log.close()

    def terminate(self, timeout: float = 60.0) -> int:
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        finally:
            self.log.close()

    def ensure_killed(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self.log.close()

    async def wait_for_partitions(self, timeout: float) -> None:
        """Until the worker logs that it owns partitions."""
        deadline = time.monotonic() + timeout
        while "owns partitions [" not in Path(self.log.name).read_text(errors="replace"):
            assert self.process.poll() is None, f"the worker exited:\n{self.output()}"
            assert time.monotonic() < deadline, "the worker was never assigned partitions"
            await asyncio.sleep(0.2)

    def output(self) -> str:
        return Path(self.log.name).read_text(errors="replace")[-3000:]


class ResultsWatcher:
    """A read-committed reader of every partition of `results` (and `dead-letters`)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.results: list = []
        self.dead_letters: list = []
        self._consumer: AIOKafkaConsumer | None = None

    async def start(self) -> None:
        prefix = self.settings.topic_prefix
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=self.settings.kafka_bootstrap,
            **kafka_client_options(self.settings),
            isolation_level="read_committed",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
        )
        await self._consumer.start()
        partitions = [
            TopicPartition(topic_name(name, prefix), partition)
            for name in ("results", "dead-letters")
            for partition in range(TOPICS[name].partitions)
        ]
        self._consumer.assign(partitions)
        await self._consumer.seek_to_beginning(*partitions)

    async def poll(self, seconds: float = 0.3) -> None:
        assert self._consumer is not None
        batch = await self._consumer.getmany(timeout_ms=int(seconds * 1000))
        for tp, records in batch.items():
            logical = tp.topic[len(self.settings.topic_prefix):]
            for record in records:
                event = decode(logical, record.value)
                (self.results if logical == "results" else self.dead_letters).append(event)

    async def wait_for(self, count: int, workers: list[Worker], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while len(self.results) < count:
            for worker in workers:
                assert worker.process.poll() is None, f"a worker exited:\n{worker.output()}"
            assert time.monotonic() < deadline, (
                f"only {len(self.results)} of {count} results after {timeout:.0f}s"
            )
            await self.poll()

    async def settle(self, seconds: float = 3.0) -> None:
        """Keep reading for a while, so a late duplicate would be seen."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            await self.poll()

    async def stop(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()


def _check_exactly_once(watcher: ResultsWatcher, requests, expected_errors, settings, base):
    counts = Counter(result.request_id for result in watcher.results)
    duplicated = {request_id: n for request_id, n in counts.items() if n > 1}
    assert not duplicated, f"{len(duplicated)} requests have more than one result"
    missing = {r.request_id for r in requests} - set(counts)
    assert not missing, f"{len(missing)} requests have no result"
    assert set(counts) == {r.request_id for r in requests}
    by_id = {result.request_id: result for result in watcher.results}
    for request_id, code in expected_errors.items():
        assert by_id[request_id].status == "error"
        assert by_id[request_id].error_code is code
    base_hash = base_model_hash(base)
    ok = [r for r in watcher.results if r.request_id not in expected_errors]
    assert all(r.status == "ok" and r.base_model_hash == base_hash for r in ok)
    assert any(r.sketch is not None for r in ok if r.adapter_id in INDEXED)
    assert all(r.sketch is None for r in ok if r.adapter_id not in INDEXED)
    letters = [d for d in watcher.dead_letters if d.source_topic.endswith("requests")]
    assert len(letters) == 1, "the undecodable request must be dead-lettered exactly once"
    assert base64.b64decode(letters[0].raw_b64) == UNDECODABLE


def test_a_killed_worker_restarts_without_losing_or_duplicating(stack, tmp_path):
    env, settings = stack
    requests, expected_errors = _requests()

    async def scenario() -> None:
        watcher = ResultsWatcher(settings)
        workers = [Worker({**env, "LORALEDGER_WORKER_ID": "w1"}, "w1", tmp_path)]
        # Bursts keep the worker busy, so each kill lands amid generation and commits.
        publisher = asyncio.create_task(_publish(settings, requests[:100], 100, 50))
        try:
            await watcher.start()
            await watcher.wait_for(30, workers[-1:], DEADLINE_S)
            workers[-1].kill()
            await publisher
            workers.append(Worker({**env, "LORALEDGER_WORKER_ID": "w1"}, "w1", tmp_path))
            await workers[-1].wait_for_partitions(DEADLINE_S)
            publisher = asyncio.create_task(_publish(settings, requests[100:200], 100))
            await watcher.wait_for(len(watcher.results) + 30, workers[-1:], DEADLINE_S)
            workers[-1].kill()
            await publisher
            publisher = asyncio.create_task(_publish(settings, requests[200:], TRICKLE_CHUNK))
            workers.append(Worker({**env, "LORALEDGER_WORKER_ID": "w1"}, "w1", tmp_path))
            await watcher.wait_for(len(requests), workers[-1:], DEADLINE_S)
            await publisher
            await watcher.settle()
            code = workers[-1].terminate()
            assert code == 0, f"SIGTERM must drain and exit 0:\n{workers[-1].output()}"
        finally:
            publisher.cancel()
            for worker in workers:
                worker.ensure_killed()
            await watcher.stop()
        _check_exactly_once(watcher, requests, expected_errors, settings, env_base(env))

    asyncio.run(scenario())


def test_a_rebalance_and_a_killed_worker_lose_and_duplicate_nothing(stack, tmp_path):
    env, settings = stack
    requests, expected_errors = _requests()

    async def scenario() -> None:
        watcher = ResultsWatcher(settings)
        first = Worker({**env, "LORALEDGER_WORKER_ID": "w1"}, "w1", tmp_path)
        second: Worker | None = None
        publisher = asyncio.create_task(_publish(settings, requests[:100], TRICKLE_CHUNK, 50))
        try:
            await watcher.start()
            await watcher.wait_for(30, [first], DEADLINE_S)
            second = Worker({**env, "LORALEDGER_WORKER_ID": "w2"}, "w2", tmp_path)
            await second.wait_for_partitions(DEADLINE_S)
            await publisher
            publisher = asyncio.create_task(_publish(settings, requests[100:180], 80))
            # Both serve until the second has committed results of its own, then one dies.
            while not any(r.worker_id == "w2" for r in watcher.results):
                await watcher.wait_for(len(watcher.results) + 1, [first, second], DEADLINE_S)
            first.kill()
            await publisher
            # Requests for the dead worker's partitions wait until the survivor takes them over.
            publisher = asyncio.create_task(_publish(settings, requests[180:], TRICKLE_CHUNK))
            await watcher.wait_for(len(requests), [second], DEADLINE_S)
            await publisher
            await watcher.settle()
            assert second.terminate() == 0, f"SIGTERM must drain and exit 0:\n{second.output()}"
        finally:
            publisher.cancel()
            first.ensure_killed()
            if second is not None:
                second.ensure_killed()
            await watcher.stop()
        _check_exactly_once(watcher, requests, expected_errors, settings, env_base(env))
        assert {r.worker_id for r in watcher.results} == {"w1", "w2"}

    asyncio.run(scenario())


def env_base(env: dict[str, str]) -> Path:
    return Path(env["LORALEDGER_BASE_MODEL"])

