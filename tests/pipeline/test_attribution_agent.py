"""The attribution processor against the real broker, with adapters, indexes and sketches from
the tiny base model: a worker killed with SIGKILL in the middle of a run and restarted leaves
exactly one committed record per result, and exactly one set of reward entries per request
(sent in the same transaction), summing to its fee."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer
from attribution_support import WORKER, billable, train_adapters, with_their_facts

from infra.kafka.clients import ensure_topics
from infra.kafka.events import publish, read_topic
from infra.kafka.security import kafka_client_options
from infra.settings import Settings
from schemas.events import InferenceResult, Parameters
from schemas.topics import topic_name

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
RESULTS = 120  # several polls of the loop, so the kill lands while some are open


def _env(settings: Settings) -> dict[str, str]:
    return {
        **os.environ,
        "LORALEDGER_HOME": str(settings.home),
        "LORALEDGER_TOPIC_PREFIX": settings.topic_prefix,
        "KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "LORALEDGER_CREDENTIALS_DIR": str(settings.credentials_dir),
        "PYTHONPATH": str(REPO),
    }


def _start_worker(settings: Settings, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "loraledger.cli", "pipeline", "-l", "info",
         "--processor", "attribution"],
        cwd=settings.home,
        env=_env(settings),
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


async def _count(settings: Settings, topic: str, isolation: str) -> Counter:
    consumer = AIOKafkaConsumer(
        topic_name(topic, settings.topic_prefix),
        bootstrap_servers=settings.kafka_bootstrap,
        **kafka_client_options(settings),
        isolation_level=isolation,
        auto_offset_reset="earliest",
        group_id=None,
    )
    await consumer.start()
    keys: Counter = Counter()
    try:
        while batch := await consumer.getmany(timeout_ms=1000):
            for records in batch.values():
                keys.update(record.key for record in records)
    finally:
        await consumer.stop()
    return keys


async def _kill_at_first_record(settings: Settings, worker: subprocess.Popen, log: Path) -> None:
    """SIGKILL the worker as soon as it has written any record, committed or not: that is
    inside its first transaction."""
    consumer = AIOKafkaConsumer(
        topic_name("attributions", settings.topic_prefix),
        bootstrap_servers=settings.kafka_bootstrap,
        **kafka_client_options(settings),
        isolation_level="read_uncommitted",
        auto_offset_reset="earliest",
        group_id=None,
    )
    await consumer.start()
    try:
        deadline = time.monotonic() + 90
        while not await consumer.getmany(timeout_ms=50):
            if time.monotonic() > deadline or worker.poll() is not None:
                raise AssertionError(f"no record from the worker; log: {log.read_text()[-2000:]}")
        os.kill(worker.pid, signal.SIGKILL)
    finally:
        await consumer.stop()


def _wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


async def _read_all(settings: Settings, topic: str) -> list:
    return [item async for item in read_topic(settings, topic, idle_timeout_s=2.0)]


def test_sigkill_mid_run_then_restart_gives_exactly_one_record_per_result(
    kafka_settings, tmp_path
):
    settings = dataclasses.replace(kafka_settings, home=tmp_path)
    ids = [f"adapter-{i}" for i in range(3)]
    adapters = train_adapters(settings, ids)
    asyncio.run(ensure_topics(settings))
    # Three adapters: results land on several partitions, so several transactions are open.
    results = []
    for i in range(RESULTS):
        adapter_id, fact = ids[i % 3], adapters.facts[i % len(adapters.facts)]
        results.append(
            InferenceResult(
                request_id=f"req-{i:03d}",
                adapter_id=adapter_id,
                status="ok",
                prompt=fact.prompt,
                output_text=fact.completion,
                adapter_hash=adapters.adapter_hashes[adapter_id],
                worker_id="worker-test",
                sketch=adapters.sketch(adapter_id, fact.prompt, fact.completion),
            )
        )
        results[-1] = billable(results[-1], prompt=2 + i % 5, completion=3)
    failed = WORKER.sign(InferenceResult(
        request_id="req-error",
        adapter_id=ids[0],
        status="error",
        error_code="internal_error",
        prompt="a prompt that failed",
        worker_id="worker-test",
    ))
    asyncio.run(publish(settings, with_their_facts([*results, failed])))

    log = tmp_path / "worker.log"
    worker = _start_worker(settings, log)
    try:
        asyncio.run(_kill_at_first_record(settings, worker, log))
        worker.wait(10)
        committed = asyncio.run(_count(settings, "attributions", "read_committed"))
        assert sum(committed.values()) < RESULTS, "the kill came after the run: nothing tested"

        worker = _start_worker(settings, log)
        _wait_for(
            lambda: (
                sum(asyncio.run(_count(settings, "attributions", "read_committed")).values())
                >= RESULTS
            ),
            120,
            f"all records after the restart (log: {log.read_text()[-2000:]})",
        )
        time.sleep(3)  # anything extra would be committed by now
    finally:
        if worker.poll() is None:
            os.kill(worker.pid, signal.SIGKILL)
            worker.wait(10)

    records = [item.event for item in asyncio.run(_read_all(settings, "attributions"))]
    per_request = Counter(record.request_id for record in records)
    assert per_request == Counter({f"req-{i:03d}": 1 for i in range(RESULTS)})
    assert all(record.status == "ok" for record in records)

    # No governance in this worker: version 0, the default price.
    price = Parameters().default_price_per_token
    entries = [item.event for item in asyncio.run(_read_all(settings, "rewards"))]
    assert len({entry.entry_id for entry in entries}) == len(entries), "an entry sent twice"
    paid: dict[str, int] = {}
    for entry in entries:
        paid[entry.request_id] = paid.get(entry.request_id, 0) + entry.amount
    assert paid == {f"req-{i:03d}": (5 + i % 5) * price for i in range(RESULTS)}
    assert {entry.parameters_version for entry in entries} == {0}
    assert {e.beneficiary_id for e in entries if e.role == "adapter_owner"} == {"owner-1"}
