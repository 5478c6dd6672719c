"""Rewards, governance and the sink on the real broker: results (with sketches, or without and
so with failed attributions) go through the attribution processor, which pays each request in
the transaction that attributes it. A worker killed with SIGKILL and restarted leaves exactly
one set of entries per request summing to its fee, a passed proposal changes the price from the
next epoch on, an operator's epoch tick tallies a proposal when no other governance event
follows it, an activation forged by a client on `governance` is dead-lettered and prices
nothing, and `loraledger replay` rebuilds a ledger equal to the live one row for row."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import ledger_probe
import pytest
from aiokafka import TopicPartition
from attribution_support import make_adapter, make_result

from infra.kafka.clients import make_admin, make_producer
from infra.kafka.events import publish, read_topic
from infra.settings import load_settings
from pipeline.app import consumer_group
from pipeline.rewards import TREASURY_ID
from schemas.codec import encode
from schemas.events import (
    AttributionRecord,
    DeadLetter,
    EpochTick,
    InferenceResult,
    ParameterChanges,
    Parameters,
    ParametersActivated,
    Proposal,
    RewardEntry,
    RewardRole,
    Usage,
    Vote,
)
from schemas.topics import topic_name

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
EPOCH_SECONDS = 100
ADAPTER = "ad-1"
OWNER = "olga"  # a quarter of every fee: enough vote weight to pass a proposal alone
OPERATOR = "gpu-0"

def at_epoch(epoch: int, second: int = 0) -> datetime:
    return datetime.fromtimestamp(epoch * EPOCH_SECONDS + second, UTC)


def attributable(index: int) -> bool:
    """Every fifth request carries no sketch: its attribution fails, and the treasury takes
    the contributors' share."""
    return index % 5 != 4


def request_results(adapter: dict, count: int, epoch: int) -> list[InferenceResult]:
    made = []
    for index in range(count):
        result = make_result(adapter, request_id=f"req-{epoch}-{index}", adapter_id=ADAPTER)
        made.append(result.model_copy(update={
            "worker_id": OPERATOR,
            "usage": Usage(prompt_tokens=10 + index, completion_tokens=3),
            "created_at": at_epoch(epoch, index),
            **({} if attributable(index) else {"sketch": None}),
        }))
    return made


def owned_adapter(adapters_dir: Path) -> dict:
    return make_adapter(adapters_dir, ADAPTER, owner_id=OWNER)


def start_worker(env: dict[str, str], cwd: Path) -> subprocess.Popen:
    log = (cwd / "worker.log").open("ab")
    # Every processor: governance, attribution (which pays) and the sink.
    return subprocess.Popen([sys.executable, "-m", "loraledger.cli", "pipeline", "-l", "warning"],
                            env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)


async def read_all(settings, topic: str) -> list:
    return [d.event async for d in read_topic(settings, topic, idle_timeout_s=3.0)
            if d.event is not None]


def wait_for(settings, topic: str, predicate, timeout_s: float = 120.0) -> list:
    deadline = time.monotonic() + timeout_s
    while True:
        events = asyncio.run(read_all(settings, topic))
        if predicate(events):
            return events
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting on {topic}: {len(events)} events")
        time.sleep(1.0)


async def consumed_by_pipeline(settings, topic: str) -> bool:
    """Whether the worker's Faust group has committed past every record of `topic`: its agents
    (the earnings table's among them) are done with them."""
    last: dict[TopicPartition, int] = {}
    async for item in read_topic(settings, topic, idle_timeout_s=2.0):
        tp = TopicPartition(item.record.topic, item.record.partition)
        last[tp] = max(last.get(tp, -1), item.record.offset)
    admin = make_admin(settings)
    await admin.start()
    try:
        group = consumer_group(settings)
        committed = await admin.list_consumer_group_offsets(group, partitions=list(last))
    finally:
        await admin.close()
    return bool(last) and all(
        tp in committed and committed[tp].offset > offset for tp, offset in last.items())


def wait_until_consumed(settings, topic: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not asyncio.run(consumed_by_pipeline(settings, topic)):
        if time.monotonic() > deadline:
            raise AssertionError(f"the worker never consumed all of {topic}")
        time.sleep(1.0)


def stop(worker: subprocess.Popen) -> None:
    worker.send_signal(signal.SIGTERM)
    try:
        worker.wait(timeout=60)
    except subprocess.TimeoutExpired:
        worker.kill()
        worker.wait()


async def send_forged_activation(settings) -> None:
    """Every fee at 1000 per token from epoch 0, as version 1, with no proposal."""
    forged = ParametersActivated(version=1, effective_epoch=0,
                                 parameters=Parameters(default_price_per_token=1000))
    producer = make_producer(settings)
    await producer.start()
    try:
        await producer.send_and_wait(topic_name("governance", settings.topic_prefix),
                                     encode(forged), key=b"")
    finally:
        await producer.stop()


def paid_requests(entries: list[RewardEntry]) -> set[str]:
    return {entry.request_id for entry in entries}


def test_rewards_exactly_once_governance_and_replay(kafka_settings, stack_env, tmp_path):
    settings = kafka_settings
    home = tmp_path / "home"  # the worker's own state (Faust data dir, adapters)
    home.mkdir()
    env = {**stack_env, "LORALEDGER_EPOCH_SECONDS": str(EPOCH_SECONDS),
           "PYTHONPATH": str(REPO), "LORALEDGER_HOME": str(home)}
    adapter = owned_adapter(load_settings(env).adapters_dir)
    phase_one = request_results(adapter, 10, epoch=10)
    phase_two = request_results(adapter, 5, epoch=12)
    everything = {result.request_id for result in [*phase_one, *phase_two]}

    first = start_worker(env, tmp_path)
    try:
        asyncio.run(publish(settings, phase_one))
        wait_for(settings, "rewards", lambda events: len(events) > 0)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()

    worker = start_worker(env, tmp_path)
    try:
        wait_for(settings, "rewards", lambda events: paid_requests(events) >= {
            result.request_id for result in phase_one})
        # The earnings table (vote weights) holds epoch 10 before anything is tallied. The
        # entries may all predate this worker, so waiting for them is not enough.
        wait_until_consumed(settings, "rewards")
        # Clients may write `governance`, but an activation there is not a decision: it goes
        # to the dead letters and prices nothing (the prices below say so).
        asyncio.run(send_forged_activation(settings.as_principal("client")))
        proposal = Proposal(proposal_id="p-price", proposer_id=OWNER, epoch=11,
                            changes=ParameterChanges(default_price_per_token=20),
                            created_at=at_epoch(11))
        asyncio.run(publish(settings, [
            proposal,
            Vote(proposal_id="p-price", voter_id=OWNER, support=True, created_at=at_epoch(11)),
            # The first governance event of epoch 12 tallies epoch 11; this late vote is ignored.
            Vote(proposal_id="p-price", voter_id=OPERATOR, support=False,
                 created_at=at_epoch(12)),
        ]))
        wait_for(settings, "governance-decisions", lambda events: any(
            isinstance(e, ParametersActivated) for e in events))
        asyncio.run(publish(settings, phase_two))
        wait_for(settings, "rewards", lambda events: paid_requests(events) >= everything)
        # Nobody proposes or votes after epoch 12: an operator's tick closes it.
        asyncio.run(publish(settings, [
            Proposal(proposal_id="p-topk", proposer_id=OWNER, epoch=12,
                     changes=ParameterChanges(top_k=4), created_at=at_epoch(12, 50)),
            Vote(proposal_id="p-topk", voter_id=OWNER, support=True,
                 created_at=at_epoch(12, 51)),
        ]))
        ticked = subprocess.run(
            [sys.executable, "-m", "loraledger.cli", "governance", "tick", "--epoch", "13"],
            env=env, cwd=tmp_path, check=True, capture_output=True, text=True, timeout=60)
        assert "tick for epoch 13" in ticked.stdout
        decisions = wait_for(settings, "governance-decisions", lambda events: any(
            isinstance(e, ParametersActivated) and e.version == 2 for e in events))
        governance = asyncio.run(read_all(settings, "governance"))
        time.sleep(5)  # no late duplicates, and the sink's last batch is written
        entries: list[RewardEntry] = asyncio.run(read_all(settings, "rewards"))
        dead_letters: list[DeadLetter] = asyncio.run(read_all(settings, "dead-letters"))
        attributions: list[AttributionRecord] = asyncio.run(read_all(settings, "attributions"))
    finally:
        stop(worker)

    assert [(letter.source_topic, letter.consumer) for letter in dead_letters] == [
        (topic_name("governance", settings.topic_prefix), "governance")]
    activation, by_tick = (e for e in decisions if isinstance(e, ParametersActivated))
    assert (activation.version, activation.effective_epoch) == (1, 12)
    tick = next(e for e in governance if isinstance(e, EpochTick))
    assert (by_tick.proposal_id, by_tick.parameters.top_k) == ("p-topk", 4)
    # The tick was published now, long after epoch 13 began: no retroactive activation.
    assert by_tick.effective_epoch == int(tick.created_at.timestamp()) // EPOCH_SECONDS
    assert sorted(a.request_id for a in attributions) == sorted(everything)
    assert len({e.entry_id for e in entries}) == len(entries), "an entry sent twice"
    by_request: dict[str, list[RewardEntry]] = {}
    for entry in entries:
        by_request.setdefault(entry.request_id, []).append(entry)
    assert set(by_request) == everything
    for request_id, group in by_request.items():
        index = int(request_id.rsplit("-", 1)[1])
        epoch = int(request_id.split("-")[1])
        price, version = (10, 0) if epoch == 10 else (20, 1)
        assert sum(e.amount for e in group) == (13 + index) * price, request_id
        assert {e.parameters_version for e in group} == {version}
        assert {e.epoch for e in group} == {epoch}
        roles = {e.beneficiary_id: e.role for e in group}
        assert (roles[OWNER], roles[OPERATOR], roles[TREASURY_ID]) == (
            RewardRole.ADAPTER_OWNER, RewardRole.COMPUTE_OPERATOR, RewardRole.TREASURY)
        contributors = {e.datanet_id for e in group if e.role == RewardRole.CONTRIBUTOR}
        assert contributors == ({"commons"} if attributable(index) else set()), request_id

    subprocess.run([sys.executable, "-m", "loraledger.cli", "replay", "--into", "rebuilt"],
                   env=env, cwd=tmp_path, check=True, capture_output=True, timeout=180)
    checked = subprocess.run(ledger_probe.command("compare", "rebuilt"), env=env, cwd=tmp_path,
                             check=True, capture_output=True, text=True, timeout=120)
    report = json.loads(checked.stdout.strip().splitlines()[-1])
    assert all(report["equal"].values()), report["equal"]
    assert report["rows"]["reward_entries"] == len(entries)
    assert report["rows"]["inference_results"] == 15
    assert report["rows"]["attribution_rows"] == sum(
        len(a.contributor_weights) for a in attributions if a.status == "ok")
    rows = {row["proposal_id"]: row for row in report["proposals"]}
    assert {pid: (row["status"], row["activated_version"]) for pid, row in rows.items()} == {
        "p-price": ("passed", 1), "p-topk": ("passed", 2)}
    assert report["rows"]["value_by_datanet_epoch"] == 2  # commons in epochs 10 and 12
