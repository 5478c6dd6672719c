"""`loraledger pipeline` stopped with SIGTERM while it works: it exits 0 on its own, and after a
restart every result has exactly one attribution, every request is paid exactly once (its
entries sum to its fee: none lost, none twice), and the ledger holds each committed event
once."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import ledger_probe
import pytest
from aiokafka import TopicPartition
from attribution_support import billable, make_adapter, make_result, with_their_facts
from kafka_stack import provisioned_settings

from infra.kafka.clients import make_admin
from infra.kafka.events import publish, read_topic
from infra.settings import Settings
from pipeline.app import consumer_group
from schemas.events import Parameters

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
ADAPTERS = ("adapter-a", "adapter-b")  # two keys: results on two partitions
STOP_BOUND_S = 30.0  # liveness bound with a wide margin; a hang would run into it


@pytest.fixture
def pipeline_env(stack_env, tmp_path) -> dict[str, str]:
    return {**stack_env, "LORALEDGER_HOME": str(tmp_path / "home"), "PYTHONPATH": str(REPO)}


def probe_ledger(env: dict[str, str], what: str, cwd: Path) -> dict:
    """Run a ledger probe in its own process: the embedded ClickHouse opens in one process at
    a time."""
    done = subprocess.run(ledger_probe.command(what), env=env, cwd=cwd, check=True,
                          capture_output=True, text=True, timeout=120)
    return json.loads(done.stdout.strip().splitlines()[-1])


def start_pipeline(env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "loraledger.cli", "pipeline", "-l", "info"],
        env=env, cwd=log.parent, stdout=log.open("ab"), stderr=subprocess.STDOUT,
    )


def stop_pipeline(pipeline: subprocess.Popen, log: Path) -> int:
    """SIGTERM; the exit code, or a failure if the pipeline is still running after the bound."""
    pipeline.send_signal(signal.SIGTERM)
    try:
        return pipeline.wait(STOP_BOUND_S)
    except subprocess.TimeoutExpired:
        pipeline.kill()
        pipeline.wait()
        raise AssertionError(
            f"still running {STOP_BOUND_S:.0f} s after SIGTERM; log: {log.read_text()[-3000:]}"
        ) from None


async def read_committed(settings: Settings, topic: str) -> list:
    return [item async for item in read_topic(settings, topic, idle_timeout_s=2.0)]


def wait_until(settings: Settings, topic: str, enough, log: Path, timeout_s: float = 120.0):
    deadline = time.monotonic() + timeout_s
    while True:
        items = asyncio.run(read_committed(settings, topic))
        if enough([item.event for item in items if item.event is not None]):
            return items
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out on {topic} ({len(items)} records); "
                                 f"log: {log.read_text()[-3000:]}")


async def wait_for_commits(settings: Settings, items: list, timeout_s: float = 60.0) -> None:
    """Until the pipeline's group has committed past `items`: every agent reading them, the
    ledger sink included, is done with them."""
    last: dict[TopicPartition, int] = {}
    for item in items:
        tp = TopicPartition(item.record.topic, item.record.partition)
        last[tp] = max(last.get(tp, -1), item.record.offset)
    admin = make_admin(settings)
    await admin.start()
    try:
        deadline = time.monotonic() + timeout_s
        group = consumer_group(settings)
        while True:
            committed = await admin.list_consumer_group_offsets(group, partitions=list(last))
            if all(tp in committed and committed[tp].offset > offset
                   for tp, offset in last.items()):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"the pipeline did not commit past {last}: {committed}")
            await asyncio.sleep(0.5)
    finally:
        await admin.close()


def results(adapters: dict, first: int, count: int) -> list:
    made = []
    for i in range(first, first + count):
        adapter_id = ADAPTERS[i % len(ADAPTERS)]
        result = make_result(adapters[adapter_id], request_id=f"req-{i:03d}",
                             adapter_id=adapter_id)
        # Tokens make a fee, and a fee makes reward entries.
        made.append(billable(result, prompt=2 + i % 20, completion=3))
    return made


def test_sigterm_mid_run_exits_zero_and_a_restart_loses_and_repeats_nothing(
    pipeline_env, tmp_path
):
    env = pipeline_env
    settings = provisioned_settings(env)
    settings.home.mkdir(parents=True)
    probe_ledger(env, "apply-ddl", settings.home)
    adapters = {
        adapter_id: make_adapter(settings.adapters_dir, adapter_id, seed=i)
        for i, adapter_id in enumerate(ADAPTERS)
    }
    log = settings.home / "pipeline.log"
    first_batch, second_batch = results(adapters, 0, 12), results(adapters, 12, 24)
    everything = {result.request_id for result in [*first_batch, *second_batch]}

    pipeline = start_pipeline(env, log)
    try:
        asyncio.run(publish(settings, with_their_facts(first_batch)))
        wait_until(settings, "rewards", lambda entries: len(entries) > 0, log)
        # More input as the signal arrives: the stop finds work under way.
        asyncio.run(publish(settings, with_their_facts(second_batch)))
        assert stop_pipeline(pipeline, log) == 0
        stop_log = log.read_text()
        assert "Not in the middle of a transaction" not in stop_log
        assert "Error while stopping" not in stop_log

        pipeline = start_pipeline(env, log)
        wait_until(settings, "attributions",
                   lambda records: {r.request_id for r in records} >= everything, log)
        inputs = [*asyncio.run(read_committed(settings, "results")),
                  *asyncio.run(read_committed(settings, "attributions"))]
        # The sink is done with every input, then with every entry; a duplicate would be
        # committed by then.
        asyncio.run(wait_for_commits(settings, inputs))
        outputs = {topic: asyncio.run(read_committed(settings, topic))
                   for topic in ("attributions", "rewards")}
        asyncio.run(wait_for_commits(settings, outputs["rewards"]))
        assert stop_pipeline(pipeline, log) == 0
    finally:
        if pipeline.poll() is None:
            os.kill(pipeline.pid, signal.SIGKILL)
            pipeline.wait()

    attributions = [item.event for item in outputs["attributions"]]
    assert Counter(a.request_id for a in attributions) == Counter(everything)
    assert {a.status for a in attributions} == {"ok"}
    entries = [item.event for item in outputs["rewards"]]
    assert len({e.entry_id for e in entries}) == len(entries)
    per_request = Counter((e.request_id, e.beneficiary_id) for e in entries)
    assert set(per_request.values()) == {1}, "a request paid twice"
    # No proposal ever passed: every fee is priced with the defaults, version 0.
    price = Parameters().default_price_per_token
    paid: dict[str, int] = {}
    for entry in entries:
        paid[entry.request_id] = paid.get(entry.request_id, 0) + entry.amount
    assert paid == {
        result.request_id: result.usage.total_tokens * price
        for result in [*first_batch, *second_batch]
    }, "a request paid twice, partly, or not at all"
    assert {e.parameters_version for e in entries} == {0}

    assert probe_ledger(env, "counts", settings.home) == {
        "inference_results": [len(everything)] * 2,
        "attributions": [len(everything)] * 2,
        "reward_entries": [len(entries)] * 2,
    }
