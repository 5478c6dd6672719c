"""Poison on the consumed topics, against the real broker and the real consumers: a value nested
100,000 levels deep and an event with a 5,000-digit integer are dead-lettered with a reason,
and the consumer keeps running and handles the valid event behind them on the same partition.

- `requests`: the inference worker (`loraledger worker`, a subprocess);
- `results` and `governance`: the pipeline (`loraledger pipeline`: the attribution processor,
  the governance agent and the ledger sink)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import ledger_probe
import pytest
from aiokafka import AIOKafkaProducer, TopicPartition
from attribution_support import WORKER, billable, make_adapter, make_result, request_for
from random_adapters import write_random_adapters

from inference.base_model import build_base_model
from inference.config import ModelConfig
from infra.kafka.clients import make_admin
from infra.kafka.events import publish, read_topic
from infra.kafka.security import ADMIN, kafka_client_options
from infra.settings import Settings, load_settings
from pipeline.app import consumer_group
from pipeline.rewards import epoch_of
from schemas.events import (
    EpochTick,
    InferenceRequest,
    ParameterChanges,
    Proposal,
    ProposalTallied,
)
from schemas.topics import topic_name

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
DEEP = b"[" * 100_000
HUGE = "9" * 5000
WAIT_S = 150.0
STOP_BOUND_S = 30.0


def huge_field(event, path: tuple[str, ...]) -> bytes:
    """`event` as JSON with the integer at `path` replaced by a 5,000-digit one (json.dumps
    cannot write it: Python refuses to convert more than 4,300 digits)."""
    document = event.model_dump(mode="json")
    holder = document
    for step in path[:-1]:
        holder = holder[step]
    holder[path[-1]] = "HUGE-SLOT"
    return json.dumps(document).replace('"HUGE-SLOT"', HUGE).encode()


async def produce_raw(settings: Settings, topic: str, key: bytes, values: list[bytes]) -> None:
    """Values as they are, one key, so they land in order on one partition."""
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap,
                                enable_idempotence=True, **kafka_client_options(settings))
    await producer.start()
    try:
        for value in values:
            await producer.send_and_wait(topic_name(topic, settings.topic_prefix), value, key=key)
    finally:
        await producer.stop()


async def read_events(settings: Settings, topic: str) -> list:
    return [item.event async for item in read_topic(settings, topic, idle_timeout_s=1.5)
            if item.event is not None]


def wait_for(settings: Settings, topic: str, found, process: subprocess.Popen, log: Path):
    """The events of `topic` once `found(events)` holds; fails if the process exits first."""
    deadline = time.monotonic() + WAIT_S
    while True:
        events = asyncio.run(read_events(settings, topic))
        if found(events):
            return events
        assert process.poll() is None, f"the consumer exited: {log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"timed out on {topic}: {log.read_text()[-3000:]}"
        time.sleep(0.5)


def letters_from(settings: Settings, topic: str, letters: list) -> list:
    return [letter for letter in letters
            if letter.source_topic == topic_name(topic, settings.topic_prefix)]


def stop(process: subprocess.Popen, log: Path) -> int:
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(STOP_BOUND_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise AssertionError(f"still running after SIGTERM: {log.read_text()[-3000:]}") from None


def assert_poison_letters(letters: list, consumer: str) -> None:
    assert [letter.offset for letter in letters] == [0, 1]
    assert {letter.consumer for letter in letters} == {consumer}
    deep, huge = letters
    assert "nests 100000 levels deep" in deep.reason
    assert deep.raw_size == len(DEEP) and deep.truncated
    assert "integer of more than 4300 digits" in huge.reason


# --- requests: the inference worker ------------------------------------------------------------


@pytest.fixture
def worker_env(stack_env, kafka_settings, tmp_path) -> dict[str, str]:
    home = tmp_path / "home"
    base = tmp_path / "base-model"
    build_base_model(base, load_settings().cache_dir, "test")
    write_random_adapters(home / "adapters", ["adapter-00"], ModelConfig.from_model_dir(base))
    return {**stack_env, "LORALEDGER_HOME": str(home), "LORALEDGER_BASE_MODEL": str(base),
            "LORALEDGER_METRICS_PORT": "0", "PYTHONPATH": str(REPO)}


def test_poison_requests_are_dead_lettered_and_the_worker_serves_the_next(worker_env, tmp_path):
    settings = load_settings(worker_env)
    good = InferenceRequest(adapter_id="adapter-00", prompt="the price of salt is",
                            max_new_tokens=4)
    huge = huge_field(InferenceRequest(adapter_id="adapter-00", prompt="x"), ("max_new_tokens",))
    asyncio.run(produce_raw(settings, "requests", b"adapter-00",
                            [DEEP, huge, good.model_dump_json().encode()]))
    log = tmp_path / "worker.log"
    worker = subprocess.Popen(
        [sys.executable, "-m", "loraledger.cli", "worker", "--worker-id", "w-poison",
         "--max-batch", "2", "--max-seq-len", "64", "--threads", "1", "--log-level", "info"],
        cwd=REPO, env=worker_env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        results = wait_for(settings, "results", lambda events: len(events) >= 1, worker, log)
        letters = wait_for(settings, "dead-letters", lambda events: len(events) >= 2, worker, log)
        assert worker.poll() is None, "the worker exited"
        assert stop(worker, log) == 0
    finally:
        if worker.poll() is None:
            os.kill(worker.pid, signal.SIGKILL)
            worker.wait()
    assert [(r.request_id, r.status) for r in results] == [(good.request_id, "ok")]
    assert_poison_letters(letters_from(settings, "requests", letters), "worker-w-poison")


# --- results and governance: the pipeline ------------------------------------------------------


async def wait_for_commit(
    settings: Settings, topic: str, process: subprocess.Popen, log: Path
) -> None:
    """Until the pipeline's group has committed past every record of `topic`: every agent
    reading it, the ledger sink included, is done with them."""
    last = {}
    async for item in read_topic(settings, topic, idle_timeout_s=1.5):
        last[TopicPartition(item.record.topic, item.record.partition)] = item.record.offset
    admin = make_admin(settings)
    await admin.start()
    try:
        deadline = time.monotonic() + WAIT_S
        group = consumer_group(settings)
        while True:
            committed = await admin.list_consumer_group_offsets(group, partitions=list(last))
            if all(tp in committed and committed[tp].offset > offset
                   for tp, offset in last.items()):
                return
            assert process.poll() is None, f"the pipeline exited: {log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"nothing committed past {last}: {committed}"
            await asyncio.sleep(0.5)
    finally:
        await admin.close()


def test_poison_results_and_governance_are_dead_lettered_and_the_pipeline_goes_on(
    stack_env, kafka_settings, tmp_path
):
    env = {**stack_env, "LORALEDGER_HOME": str(tmp_path / "home"), "PYTHONPATH": str(REPO)}
    # The test writes results and governance as the admin, standing in for their producers.
    settings = load_settings(env).as_principal(ADMIN)
    settings.home.mkdir(parents=True)
    subprocess.run(ledger_probe.command("apply-ddl"), env=env, cwd=settings.home, check=True,
                   capture_output=True, timeout=120)

    adapter = make_adapter(settings.adapters_dir, "adapter-a")
    good_result = billable(make_result(adapter, request_id="req-good", adapter_id="adapter-a"),
                           prompt=5, completion=2)
    asyncio.run(publish(settings, [WORKER.as_worker(), request_for(good_result)]))
    huge_result = huge_field(good_result.model_copy(update={"request_id": "req-huge"}),
                             ("usage", "prompt_tokens"))
    asyncio.run(produce_raw(settings, "results", b"adapter-a",
                            [DEEP, huge_result, good_result.model_dump_json().encode()]))

    now_epoch = epoch_of(datetime.now(UTC), settings.epoch_seconds)
    proposal = Proposal(proposer_id="alice", epoch=now_epoch - 1,
                        changes=ParameterChanges(top_k=4))
    huge_proposal = huge_field(proposal.model_copy(update={"proposal_id": "p-huge"}), ("epoch",))
    # The tick closes the proposal's epoch: the tally it causes shows the proposal was taken.
    asyncio.run(produce_raw(settings, "governance", proposal.proposal_id.encode(),
                            [DEEP, huge_proposal, proposal.model_dump_json().encode(),
                             EpochTick(epoch=now_epoch).model_dump_json().encode()]))

    log = settings.home / "pipeline.log"
    pipeline = subprocess.Popen(
        [sys.executable, "-m", "loraledger.cli", "pipeline", "-l", "info"],
        env=env, cwd=settings.home, stdout=log.open("ab"), stderr=subprocess.STDOUT,
    )
    try:
        attributions = wait_for(settings, "attributions", lambda events: len(events) >= 1,
                                pipeline, log)
        tallies = wait_for(
            settings, "governance-decisions",
            lambda events: any(isinstance(e, ProposalTallied) for e in events), pipeline, log,
        )
        letters = wait_for(settings, "dead-letters", lambda events: len(events) >= 4,
                           pipeline, log)
        asyncio.run(wait_for_commit(settings, "results", pipeline, log))
        assert pipeline.poll() is None, "the pipeline exited"
        assert stop(pipeline, log) == 0
    finally:
        if pipeline.poll() is None:
            os.kill(pipeline.pid, signal.SIGKILL)
            pipeline.wait()

    assert [a.request_id for a in attributions] == ["req-good"]
    (tallied,) = [e for e in tallies if isinstance(e, ProposalTallied)]
    assert tallied.proposal_id == proposal.proposal_id
    assert_poison_letters(letters_from(settings, "results", letters), "attribution")
    assert_poison_letters(letters_from(settings, "governance", letters), "governance")
    stored = subprocess.run(ledger_probe.command("ids", "inference_results"), env=env,
                            cwd=settings.home, check=True, capture_output=True, text=True,
                            timeout=120).stdout
    assert "req-good" in json.loads(stored)
