"""Two `loraledger pipeline` instances share one stream of results: instances join, one is
SIGKILLed mid-stream, it comes back, the other leaves with SIGTERM. Joining and leaving are
routine (no instance exits, none with Faust's ConsistencyError), every result is attributed
exactly once and paid exactly once, and every instance prices with the governance parameters
in force (each holds the whole parameter history, including the one that joined last)."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import pytest
from aiokafka import TopicPartition
from attribution_support import WORKER, billable, make_adapter, make_result, request_for
from kafka_stack import provisioned_settings
from pipeline_process import OWNS_PARTITIONS

from infra.kafka.clients import make_admin
from infra.kafka.events import publish, read_topic
from infra.settings import Settings
from pipeline.app import consumer_group
from schemas.events import InferenceResult, Parameters, ParametersActivated
from schemas.topics import topic_name

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
ADAPTERS = tuple(f"adapter-{i}" for i in range(8))  # results on most of the 8 partitions
PRICE = 7  # differs from the default, so a result priced without the history shows
DEADLINE_S = 180.0  # liveness bound for a loaded machine; a stuck instance runs into it


class Instance:
    """One `loraledger pipeline -p attribution -p governance` process and its log."""

    def __init__(self, env: dict[str, str], name: str, log_dir: Path) -> None:
        self.log = log_dir / f"{name}-{time.monotonic_ns()}.log"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "loraledger.cli", "pipeline", "-l", "info",
             "-p", "attribution", "-p", "governance"],
            env=env, cwd=REPO, stdout=self.log.open("ab"), stderr=subprocess.STDOUT,
        )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def excerpt(self) -> str:
        """The log from its first traceback (where a crash starts), else its tail."""
        text = self.output()
        start = text.find("Traceback (most recent call last)")
        return text[start:start + 6000] if start >= 0 else text[-4000:]

    def alive(self) -> None:
        assert self.process.poll() is None, f"an instance exited:\n{self.excerpt()}"

    def wait_for_partitions(self) -> None:
        deadline = time.monotonic() + DEADLINE_S
        while not OWNS_PARTITIONS.search(self.output()):
            self.alive()
            assert time.monotonic() < deadline, f"never assigned:\n{self.excerpt()}"
            time.sleep(0.5)

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def terminate(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(
                f"still running after SIGTERM:\n{self.excerpt()}"
            ) from None

    def ensure_stopped(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def results(adapters: dict, first: int, count: int) -> list[InferenceResult]:
    """Results signed by the registered worker, with token ids their usage recounts."""
    made = []
    for i in range(first, first + count):
        adapter_id = ADAPTERS[i % len(ADAPTERS)]
        result = make_result(adapters[adapter_id], request_id=f"req-{i:04d}",
                             adapter_id=adapter_id)
        made.append(billable(result, 10 + i % 7, 3))
    return made


def publish_answered(settings: Settings, batch: list[InferenceResult]) -> None:
    """The requests `batch` answers, acknowledged before the results are sent."""
    asyncio.run(publish(settings, [request_for(result) for result in batch]))
    asyncio.run(publish(settings, batch))


async def read_committed(settings: Settings, topic: str) -> list:
    return [item async for item in read_topic(settings, topic, idle_timeout_s=2.0)]


def attributed(settings: Settings) -> Counter:
    items = asyncio.run(read_committed(settings, "attributions"))
    return Counter(item.event.request_id for item in items if item.event is not None)


def wait_for_attributions(settings: Settings, count: int, instances: list[Instance]) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while sum(attributed(settings).values()) < count:
        for instance in instances:
            instance.alive()
        assert time.monotonic() < deadline, f"fewer than {count} attributions in time"
        time.sleep(1.0)


async def governance_consumed(settings: Settings) -> bool:
    # Activations are governance decisions, on a topic of their own.
    tp = TopicPartition(topic_name("governance-decisions", settings.topic_prefix), 0)
    admin = make_admin(settings)
    await admin.start()
    try:
        committed = await admin.list_consumer_group_offsets(consumer_group(settings),
                                                            partitions=[tp])
    finally:
        await admin.close()
    return tp in committed and committed[tp].offset >= 1


def test_instances_join_leave_and_die_without_losing_or_repeating_a_payment(
    stack_env, tmp_path
):
    env = {**stack_env, "LORALEDGER_HOME": str(tmp_path / "home"), "PYTHONPATH": str(REPO)}
    settings = provisioned_settings(env)  # the topics and their ACLs; the test is the admin
    adapters = {
        adapter_id: make_adapter(settings.adapters_dir, adapter_id, seed=i)
        for i, adapter_id in enumerate(ADAPTERS)
    }
    activation = ParametersActivated(
        version=1, effective_epoch=0, parameters=Parameters(default_price_per_token=PRICE),
        created_at=datetime.now(UTC),
    )
    asyncio.run(publish(settings, [activation, WORKER.as_worker()]))
    batches = [results(adapters, 40 * n, 40) for n in range(4)]
    everything = [result for batch in batches for result in batch]

    first = Instance(env, "first", tmp_path)
    instances = [first]
    try:
        first.wait_for_partitions()
        deadline = time.monotonic() + DEADLINE_S
        while not asyncio.run(governance_consumed(settings)):
            first.alive()
            assert time.monotonic() < deadline, "the activation was never consumed"
            time.sleep(0.5)
        publish_answered(settings, batches[0])
        wait_for_attributions(settings, 10, [first])

        # A second instance joins mid-stream and takes over some partitions.
        second = Instance(env, "second", tmp_path)
        instances.append(second)
        publish_answered(settings, batches[1])
        second.wait_for_partitions()
        first.alive()

        # The first dies with work under way; the second inherits its partitions.
        publish_answered(settings, batches[2])
        first.kill()
        wait_for_attributions(settings, 120, [second])

        # It comes back, and then the second leaves.
        again = Instance(env, "again", tmp_path)
        instances.append(again)
        again.wait_for_partitions()
        publish_answered(settings, batches[3])
        second.alive()
        assert second.terminate() == 0, second.excerpt()
        wait_for_attributions(settings, len(everything), [again])
        time.sleep(3.0)  # a late duplicate would land meanwhile
        again.alive()
        assert again.terminate() == 0, again.excerpt()
    finally:
        for instance in instances:
            instance.ensure_stopped()

    for instance in instances:
        assert "ConsistencyError" not in instance.output()
    assert attributed(settings) == Counter(r.request_id for r in everything)
    entries = [item.event for item in asyncio.run(read_committed(settings, "rewards"))]
    assert len({e.entry_id for e in entries}) == len(entries)
    assert set(Counter((e.request_id, e.beneficiary_id) for e in entries).values()) == {1}
    paid: Counter = Counter()
    for entry in entries:
        paid[entry.request_id] += entry.amount
    assert paid == {r.request_id: r.usage.total_tokens * PRICE for r in everything}
    assert {e.parameters_version for e in entries} == {1}
