"""The rewards, governance and sink agents on the real broker: a worker killed with SIGKILL and
restarted (with redelivered inputs) leaves exactly one set of entries per request, a passed
proposal changes the price from the next epoch on, an operator's epoch tick tallies a proposal
when no other governance event follows it, and `loraledger replay` rebuilds a ledger equal to
the live one row for row."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient

from pipeline.kafka_io import publish, read_topic
from schemas.events import (
    AdapterRegistered,
    AttributionRecord,
    ContributorWeight,
    EpochTick,
    InferenceResult,
    MethodInfo,
    ParameterChanges,
    ParametersActivated,
    Proposal,
    RewardEntry,
    Usage,
    Vote,
)

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
EPOCH_SECONDS = 100
HASH = "c" * 64
AGENTS = "pipeline.governance_agent, pipeline.rewards_agent, pipeline.sink"
WORKER = (
    f"import sys, {AGENTS}; from pipeline.app import app; "
    "sys.argv = ['worker', 'worker', '-l', 'warn', '--without-web']; app.main()"
)

CHECK_LEDGER = """
import json
from infra.clickhouse_client import get_client
from infra.settings import load_settings
from pipeline import queries
from pipeline.ledger import TABLES
from pipeline.replay import ROLLUP_TABLES, table_fingerprint
client = get_client(load_settings())
tables = [*TABLES, *ROLLUP_TABLES]
print(json.dumps({
    "equal": {t: table_fingerprint(client, "loraledger", t)
                 == table_fingerprint(client, "rebuilt", t) for t in tables},
    "rows": {t: len(table_fingerprint(client, "loraledger", t)) for t in tables},
    "proposals": queries.proposals(client, "loraledger").records(),
}, default=str))
"""


def at_epoch(epoch: int, second: int = 0) -> datetime:
    return datetime.fromtimestamp(epoch * EPOCH_SECONDS + second, UTC)


def request_events(index: int, epoch: int) -> list:
    request_id = f"req-{epoch}-{index}"
    when = at_epoch(epoch, index)
    return [
        InferenceResult(
            request_id=request_id, adapter_id="ad-1", status="ok", worker_id="gpu-0",
            usage=Usage(prompt_tokens=10 + index, completion_tokens=3), created_at=when,
        ),
        AttributionRecord(
            request_id=request_id, adapter_id="ad-1", status="ok", evidence_hash=HASH,
            method=MethodInfo(name="trak", version="1"), created_at=when,
            contributor_weights=[
                ContributorWeight(contributor_id="alice", datanet_id="dn-1", ppm=700_000),
                ContributorWeight(contributor_id="bob", datanet_id="dn-2", ppm=300_000),
            ],
        ),
    ]


def start_worker(env: dict[str, str], cwd: Path) -> subprocess.Popen:
    log = (cwd / "worker.log").open("ab")
    return subprocess.Popen([sys.executable, "-c", WORKER], env=env, cwd=cwd,
                            stdout=log, stderr=subprocess.STDOUT)


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


async def changelog_has_records(settings, table: str) -> bool:
    """Whether a Faust table's changelog holds a committed record yet."""
    name = f"{settings.topic_prefix}loraledger-pipeline-{table}-changelog"
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        if name not in await admin.list_topics():
            return False  # subscribing now could auto-create it with the wrong partitions
    finally:
        await admin.close()
    consumer = AIOKafkaConsumer(name, bootstrap_servers=settings.kafka_bootstrap,
                                isolation_level="read_committed", enable_auto_commit=False,
                                auto_offset_reset="earliest")
    await consumer.start()
    try:
        return bool(await consumer.getmany(timeout_ms=3000))
    finally:
        await consumer.stop()


def wait_for_owner(settings, timeout_s: float = 120.0) -> None:
    """The owner table has the registration, so no result is paid before its owner is known
    (an unknown owner's share would go to the treasury, by design)."""
    deadline = time.monotonic() + timeout_s
    while not asyncio.run(changelog_has_records(settings, "adapter-owners")):
        if time.monotonic() > deadline:
            raise AssertionError("the adapter registration never reached the owner table")
        time.sleep(1.0)


def stop(worker: subprocess.Popen) -> None:
    worker.send_signal(signal.SIGTERM)
    try:
        worker.wait(timeout=60)
    except subprocess.TimeoutExpired:
        worker.kill()
        worker.wait()


def test_rewards_exactly_once_governance_and_replay(kafka_settings, stack_env, tmp_path):
    settings = kafka_settings
    home = tmp_path / "home"  # the worker's own state (Faust data dir), whatever the caller's
    home.mkdir()
    env = {**stack_env, "LORALEDGER_EPOCH_SECONDS": str(EPOCH_SECONDS),
           "PYTHONPATH": str(REPO), "LORALEDGER_HOME": str(home)}
    owner = AdapterRegistered(
        adapter_id="ad-1", owner_id="olga", base_model_hash=HASH, weights_hash=HASH, rank=8,
        datanet_id="dn-1", snapshot_version=1, snapshot_hash=HASH,
    )
    phase_one = [event for i in range(10) for event in request_events(i, epoch=10)]

    first = start_worker(env, tmp_path)
    try:
        asyncio.run(publish(settings, [owner]))
        wait_for_owner(settings)
        asyncio.run(publish(settings, phase_one))
        wait_for(settings, "rewards", lambda events: len(events) > 0)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    asyncio.run(publish(settings, phase_one))  # redelivered inputs after the crash

    worker = start_worker(env, tmp_path)
    try:
        wait_for(settings, "rewards", lambda events: len(events) >= 50)
        time.sleep(3)  # let the earnings table take in epoch 10 before the tally
        proposal = Proposal(proposal_id="p-price", proposer_id="alice", epoch=11,
                            changes=ParameterChanges(default_price_per_token=20),
                            created_at=at_epoch(11))
        asyncio.run(publish(settings, [
            proposal,
            Vote(proposal_id="p-price", voter_id="alice", support=True, created_at=at_epoch(11)),
            # The first governance event of epoch 12 tallies epoch 11; this late vote is ignored.
            Vote(proposal_id="p-price", voter_id="bob", support=False, created_at=at_epoch(12)),
        ]))
        governance = wait_for(settings, "governance", lambda events: any(
            isinstance(e, ParametersActivated) for e in events))
        phase_two = [event for i in range(5) for event in request_events(i, epoch=12)]
        asyncio.run(publish(settings, phase_two))
        entries: list[RewardEntry] = wait_for(settings, "rewards",
                                              lambda events: len(events) >= 75)
        # Nobody proposes or votes after epoch 12: an operator's tick closes it.
        asyncio.run(publish(settings, [
            Proposal(proposal_id="p-topk", proposer_id="alice", epoch=12,
                     changes=ParameterChanges(top_k=4), created_at=at_epoch(12, 50)),
            Vote(proposal_id="p-topk", voter_id="alice", support=True,
                 created_at=at_epoch(12, 51)),
        ]))
        ticked = subprocess.run(
            [sys.executable, "-m", "pipeline.cli", "governance", "tick", "--epoch", "13"],
            env=env, cwd=tmp_path, check=True, capture_output=True, text=True, timeout=60)
        assert "tick for epoch 13" in ticked.stdout
        governance = wait_for(settings, "governance", lambda events: any(
            isinstance(e, ParametersActivated) and e.version == 2 for e in events))
        time.sleep(5)  # no late duplicates, and the sink's last batch is written
        entries = asyncio.run(read_all(settings, "rewards"))
    finally:
        stop(worker)

    activation, by_tick = (e for e in governance if isinstance(e, ParametersActivated))
    assert (activation.version, activation.effective_epoch) == (1, 12)
    tick = next(e for e in governance if isinstance(e, EpochTick))
    assert (by_tick.proposal_id, by_tick.parameters.top_k) == ("p-topk", 4)
    # The tick was published now, long after epoch 13 began: no retroactive activation.
    assert by_tick.effective_epoch == int(tick.created_at.timestamp()) // EPOCH_SECONDS
    assert len(entries) == 75
    assert len({e.entry_id for e in entries}) == 75
    by_request: dict[str, list[RewardEntry]] = {}
    for entry in entries:
        by_request.setdefault(entry.request_id, []).append(entry)
    assert len(by_request) == 15
    for request_id, group in by_request.items():
        index = int(request_id.rsplit("-", 1)[1])
        epoch = int(request_id.split("-")[1])
        price, version = (10, 0) if epoch == 10 else (20, 1)
        assert sum(e.amount for e in group) == (13 + index) * price
        assert {e.parameters_version for e in group} == {version}
        assert {e.beneficiary_id for e in group} == {"alice", "bob", "olga", "gpu-0", "treasury"}

    subprocess.run([sys.executable, "-m", "pipeline.cli", "replay", "--into", "rebuilt"],
                   env=env, cwd=tmp_path, check=True, capture_output=True, timeout=180)
    checked = subprocess.run([sys.executable, "-c", CHECK_LEDGER], env=env, cwd=tmp_path,
                             check=True, capture_output=True, text=True, timeout=120)
    report = json.loads(checked.stdout.strip().splitlines()[-1])
    assert all(report["equal"].values()), report["equal"]
    assert report["rows"]["reward_entries"] == 75
    assert report["rows"]["inference_results"] == 15
    assert report["rows"]["attribution_rows"] == 30
    rows = {row["proposal_id"]: row for row in report["proposals"]}
    assert {pid: (row["status"], row["activated_version"]) for pid, row in rows.items()} == {
        "p-price": ("passed", 1), "p-topk": ("passed", 2)}
    assert report["rows"]["value_by_datanet_epoch"] == 4  # dn-1 and dn-2 in epochs 10 and 12
