"""Rewards, governance and the sink on the real broker: results (with sketches, or without and
so with failed attributions) go through the attribution processor, which pays each request in
the transaction that attributes it. A worker killed with SIGKILL and restarted leaves exactly
one set of entries per request summing to its fee, a passed proposal changes the price from the
next epoch on, an operator's epoch tick tallies a proposal when no other governance event
follows it, an activation forged by a client on `governance` is dead-lettered and prices
nothing, and `loraledger replay` rebuilds a ledger equal to the live one row for row.

Epochs are the broker's (log-append time), so the test runs on the wall clock with short
epochs and waits for their boundaries."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import ledger_probe
import pytest
from aiokafka import TopicPartition
from attribution_support import billable, make_adapter, make_result, with_their_facts
from signing import Identity

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
    Vote,
)
from schemas.topics import topic_name

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
EPOCH_SECONDS = 10
ADAPTER = "ad-1"
OWNER = Identity.new("olga")  # a quarter of every fee: enough vote weight to pass alone
OPERATOR = Identity.new("gpu-0")  # a worker, and a voter with the same id


def epoch_now() -> int:
    return int(time.time()) // EPOCH_SECONDS


def wait_for_epoch_after(epoch: int) -> int:
    """Sleep to just past the start of an epoch after `epoch` and after the current one, so
    the events published next all fall in it; its number."""
    target = max(epoch, epoch_now()) + 1
    time.sleep(max(0.0, target * EPOCH_SECONDS + 0.5 - time.time()))
    return target


def attributable(index: int) -> bool:
    """Every fifth request carries no sketch: its attribution fails, and the treasury takes
    the contributors' share."""
    return index % 5 != 4


def request_results(adapter: dict, count: int, phase: int) -> list[InferenceResult]:
    made = []
    for index in range(count):
        result = make_result(adapter, request_id=f"req-{phase}-{index}", adapter_id=ADAPTER)
        if not attributable(index):
            result = result.model_copy(update={"sketch": None})
        made.append(billable(result, prompt=10 + index, completion=3, worker=OPERATOR))
    return made


def owned_adapter(adapters_dir: Path) -> dict:
    return make_adapter(adapters_dir, ADAPTER, owner_id=OWNER.name)


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
    phase_one = request_results(adapter, 10, phase=1)
    phase_two = request_results(adapter, 5, phase=2)
    everything = {result.request_id for result in [*phase_one, *phase_two]}
    asyncio.run(publish(settings, [OWNER.as_voter(), OPERATOR.as_voter()]))

    first = start_worker(env, tmp_path)
    try:
        asyncio.run(publish(settings, with_their_facts(phase_one, OPERATOR)))
        wait_for(settings, "rewards", lambda events: len(events) > 0)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()

    worker = start_worker(env, tmp_path)
    try:
        paid = wait_for(settings, "rewards", lambda events: paid_requests(events) >= {
            result.request_id for result in phase_one})
        # The earnings table (vote weights) holds phase one before anything is tallied. The
        # entries may all predate this worker, so waiting for them is not enough.
        wait_until_consumed(settings, "rewards")
        # Clients may write `governance`, but an activation there is not a decision: it goes
        # to the dead letters and prices nothing (the prices below say so).
        asyncio.run(send_forged_activation(settings.as_principal("client")))
        proposal_epoch = wait_for_epoch_after(max(entry.epoch for entry in paid))
        proposal = Proposal(proposal_id="p-price", proposer_id=OWNER.name, epoch=proposal_epoch,
                            changes=ParameterChanges(default_price_per_token=20))
        asyncio.run(publish(settings, [
            proposal, OWNER.sign(Vote(proposal_id="p-price", voter_id=OWNER.name, support=True)),
        ]))
        wait_for_epoch_after(proposal_epoch)
        # The first governance event of the next epoch tallies the proposal; this late vote
        # counts nowhere.
        asyncio.run(publish(settings, [
            OPERATOR.sign(Vote(proposal_id="p-price", voter_id=OPERATOR.name, support=False)),
        ]))
        wait_for(settings, "governance-decisions", lambda events: any(
            isinstance(e, ParametersActivated) for e in events))
        asyncio.run(publish(settings, with_their_facts(phase_two, OPERATOR)))
        wait_for(settings, "rewards", lambda events: paid_requests(events) >= everything)
        # Nobody proposes or votes after this epoch: an operator's tick closes it.
        topk_epoch = wait_for_epoch_after(epoch_now())
        asyncio.run(publish(settings, [
            Proposal(proposal_id="p-topk", proposer_id=OWNER.name, epoch=topk_epoch,
                     changes=ParameterChanges(top_k=4)),
            OWNER.sign(Vote(proposal_id="p-topk", voter_id=OWNER.name, support=True)),
        ]))
        tick_epoch = wait_for_epoch_after(topk_epoch)
        ticked = subprocess.run(
            [sys.executable, "-m", "loraledger.cli", "governance", "tick", "--epoch",
             str(tick_epoch)],
            env=env, cwd=tmp_path, check=True, capture_output=True, text=True, timeout=60)
        assert f"tick for epoch {tick_epoch}" in ticked.stdout
        decisions = wait_for(settings, "governance-decisions", lambda events: any(
            isinstance(e, ParametersActivated) and e.version == 2 for e in events))
        governance = asyncio.run(read_all(settings, "governance"))
        time.sleep(5)  # no late duplicates, and the sink's last batch is written
        entries: list[RewardEntry] = asyncio.run(read_all(settings, "rewards"))
        dead_letters: list[DeadLetter] = asyncio.run(read_all(settings, "dead-letters"))
        attributions: list[AttributionRecord] = asyncio.run(read_all(settings, "attributions"))
    finally:
        stop(worker)

    # The forged activation is refused by the governance agent, first of its dead letters.
    refused = [(letter.source_topic, letter.consumer) for letter in dead_letters]
    assert refused[0] == (topic_name("governance", settings.topic_prefix), "governance")
    assert "refused" not in dead_letters[0].reason  # it did not decode: not a governance input
    activation, by_tick = (e for e in decisions if isinstance(e, ParametersActivated))
    assert (activation.version, activation.effective_epoch) == (1, proposal_epoch + 1)
    assert any(isinstance(e, EpochTick) for e in governance)
    assert (by_tick.proposal_id, by_tick.parameters.top_k) == ("p-topk", 4)
    # Activated from the epoch the broker appended the tick in (the tally's time), never
    # retroactively.
    assert by_tick.effective_epoch == int(by_tick.created_at.timestamp()) // EPOCH_SECONDS
    assert by_tick.effective_epoch >= tick_epoch
    assert sorted(a.request_id for a in attributions) == sorted(everything)
    assert len({e.entry_id for e in entries}) == len(entries), "an entry sent twice"
    by_request: dict[str, list[RewardEntry]] = {}
    for entry in entries:
        by_request.setdefault(entry.request_id, []).append(entry)
    assert set(by_request) == everything
    for request_id, group in by_request.items():
        index = int(request_id.rsplit("-", 1)[1])
        phase = int(request_id.split("-")[1])
        price, version = (10, 0) if phase == 1 else (20, 1)
        assert sum(e.amount for e in group) == (13 + index) * price, request_id
        assert {e.parameters_version for e in group} == {version}
        (epoch,) = {e.epoch for e in group}
        if phase == 1:
            assert epoch < proposal_epoch
        else:
            assert epoch >= activation.effective_epoch
        roles = {e.beneficiary_id: e.role for e in group}
        assert (roles[OWNER.name], roles[OPERATOR.name], roles[TREASURY_ID]) == (
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
    datanet_epochs = {(e.datanet_id, e.epoch) for e in entries if e.role == RewardRole.CONTRIBUTOR}
    assert report["rows"]["value_by_datanet_epoch"] == len(datanet_epochs)
