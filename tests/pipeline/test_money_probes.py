"""Adversarial probes on the real broker: money is paid from facts in the log, votes count for
the voter that signed them, and time is the broker's.

- Results: forged usage (10^12 prompt tokens) is not paid and `verify` fails; a result with no
  request is not paid; a request id sent to two adapters is paid once and its entries sum to
  its fee; a result claiming a worker whose key it does not hold credits nobody.
- Governance: a vote cast as another voter, an unsigned vote and a vote dated 2100 have no
  effect; a reused proposal id is refused by the agent and by the ledger's view alike.
"""

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
import pipeline_process
import pytest
from attribution_support import WORKER, billable, make_adapter, make_result, request_for
from kafka_stack import provisioned_settings
from signing import Identity

from infra.kafka.events import publish, read_topic
from infra.settings import Settings
from pipeline.attribution.agent import run_attribution
from pipeline.attribution.parameters import DEFAULTS
from pipeline.rewards import TREASURY_ID
from pipeline.verify import verify_request
from schemas.events import (
    DeadLetter,
    EpochTick,
    ParameterChanges,
    ParametersActivated,
    Proposal,
    ProposalTallied,
    RewardEntry,
    RewardRole,
    Usage,
    Vote,
    reward_entry_id,
)

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
PRICE = DEFAULTS.parameters_for_epoch(0).parameters.default_price_per_token


async def _read(settings: Settings, topic: str) -> list:
    return [d.event async for d in read_topic(settings, topic, idle_timeout_s=1.0)
            if d.event is not None]


def _wait_for(settings: Settings, topic: str, predicate, timeout_s: float = 90.0) -> list:
    deadline = time.monotonic() + timeout_s
    while True:
        events = asyncio.run(_read(settings, topic))
        if predicate(events):
            return events
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out on {topic}: {events}")
        time.sleep(0.5)


async def _attribute_until(settings: Settings, done) -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(run_attribution(settings, DEFAULTS, stop))
    try:
        deadline = time.monotonic() + 120
        while not done(await _read(settings, "dead-letters"), await _read(settings, "rewards")):
            if task.done():
                task.result()
            if time.monotonic() > deadline:
                raise AssertionError("the processor did not get through the probes")
            await asyncio.sleep(0.5)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


def test_results_are_paid_from_facts_not_claims(kafka_settings):
    settings = kafka_settings
    adapter = make_adapter(settings.adapters_dir, "adapter-a", owner_id="olga")
    make_adapter(settings.adapters_dir, "adapter-b", seed=1, owner_id="oscar")
    mallory = Identity.new("mallory")

    def served(request_id: str, adapter_id: str = "adapter-a", **signer):
        return billable(make_result(adapter, request_id=request_id, adapter_id=adapter_id),
                        prompt=5, completion=3, **signer)

    honest = served("honest")
    forged = served("forged", worker=mallory).model_copy(
        update={"usage": Usage(prompt_tokens=4_000_000_000, completion_tokens=3)})
    forged = mallory.sign(forged)
    # A registered worker cannot inflate usage either: it must count the token ids.
    inflated = WORKER.sign(served("inflated").model_copy(
        update={"usage": Usage(prompt_tokens=4_000_000_000, completion_tokens=3)}))
    orphan = served("orphan")
    twice_a, twice_b = served("twice"), served("twice", adapter_id="adapter-b")
    impersonating = served("impersonating").model_copy(update={"signature": None})
    impersonating = mallory.sign(impersonating)
    requests = [request_for(r) for r in (honest, forged, inflated, twice_a, twice_b,
                                         impersonating)]
    results = [honest, forged, inflated, orphan, twice_a, twice_b, impersonating]
    asyncio.run(publish(settings, [WORKER.as_worker(), *requests, *results]))

    refused_ids = {"forged", "inflated", "orphan", "impersonating"}

    def done(letters: list[DeadLetter], entries: list[RewardEntry]) -> bool:
        refused = {json.loads(_raw(letter))["request_id"] for letter in letters}
        return refused >= refused_ids | {"twice"} and {"honest", "twice"} <= {
            entry.request_id for entry in entries}

    asyncio.run(_attribute_until(settings, done))
    entries: list[RewardEntry] = asyncio.run(_read(settings, "rewards"))
    letters: list[DeadLetter] = asyncio.run(_read(settings, "dead-letters"))
    reasons = {json.loads(_raw(letter))["request_id"]: letter.reason for letter in letters}

    assert {entry.request_id for entry in entries} == {"honest", "twice"}
    assert sum(e.amount for e in entries if e.request_id == "honest") == 8 * PRICE
    assert "worker mallory is not authenticated" in reasons["forged"]
    assert "does not recount" in reasons["inflated"]
    assert "no request orphan on `requests`" in reasons["orphan"]
    assert "does not verify" in reasons["impersonating"]
    assert "request twice is already paid" in reasons["twice"]
    assert "mallory" not in {entry.beneficiary_id for entry in entries}
    operators = {e.beneficiary_id for e in entries if e.role == RewardRole.COMPUTE_OPERATOR}
    assert operators == {WORKER.name}
    # Paid once, by one adapter, and the ledger's check holds: the entries sum to the fee.
    twice = [entry for entry in entries if entry.request_id == "twice"]
    assert len({entry.adapter_id for entry in twice}) == 1
    assert {entry.fee_total for entry in twice} == {8 * PRICE}
    assert sum(entry.amount for entry in twice) == 8 * PRICE
    attributed = [record.request_id for record in asyncio.run(_read(settings, "attributions"))]
    assert sorted(attributed) == ["honest", "twice"]

    for request_id, field in (("forged", "result.signature"), ("orphan", "request")):
        report = verify_request(settings, request_id, check_sketch=False)
        assert report.status == "mismatch" and report.difference.field == field, report
    assert verify_request(settings, "inflated", check_sketch=False).status == "mismatch"


def _raw(letter: DeadLetter) -> bytes:
    import base64

    return base64.b64decode(letter.raw_b64)


# --- governance ---------------------------------------------------------------------------

EPOCH_SECONDS = 10


def _epoch_now() -> int:
    return int(time.time()) // EPOCH_SECONDS


def _next_epoch() -> int:
    """Sleep into the next epoch (with a margin over the boundary); its number."""
    epoch = _epoch_now() + 1
    time.sleep(max(0.0, epoch * EPOCH_SECONDS + 0.5 - time.time()))
    return epoch


def _earned(beneficiary: str, amount: int) -> RewardEntry:
    request_id = f"earned-by-{beneficiary}"
    return RewardEntry(
        entry_id=reward_entry_id(request_id, beneficiary, "adapter_owner"),
        request_id=request_id, adapter_id="adapter-a", epoch=1, beneficiary_id=beneficiary,
        role=RewardRole.ADAPTER_OWNER, amount=amount, fee_total=amount, parameters_version=0,
    )


def test_votes_count_only_for_their_signer_and_proposal_ids_are_used_once(stack_env, tmp_path):
    env = {**stack_env, "LORALEDGER_HOME": str(tmp_path / "home"), "PYTHONPATH": str(REPO),
           "LORALEDGER_EPOCH_SECONDS": str(EPOCH_SECONDS)}
    settings = provisioned_settings(env)  # the topics and their ACLs; the test is the admin
    settings.home.mkdir(parents=True)
    subprocess.run(ledger_probe.command("apply-ddl"), env=env, cwd=tmp_path, check=True,
                   capture_output=True, timeout=120)
    alice, bob, mallory = Identity.new("alice"), Identity.new("bob"), Identity.new("mallory")
    asyncio.run(publish(settings, [_earned("alice", 600), _earned("bob", 400),
                                   _earned(TREASURY_ID, 10_000)]))
    log = (tmp_path / "pipeline.log").open("ab")
    pipeline = subprocess.Popen(
        [sys.executable, "-m", "loraledger.cli", "pipeline", "-p", "governance", "-p", "sink",
         "-l", "warning"], env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_for(settings, "dead-letters", lambda _: True)  # the topics exist
        epoch = _next_epoch()
        first = Proposal(proposal_id="p1", proposer_id="alice", epoch=epoch,
                         changes=ParameterChanges(top_k=4))
        reused = Proposal(proposal_id="p1", proposer_id="mallory", epoch=epoch,
                          changes=ParameterChanges(default_price_per_token=10_000))
        asyncio.run(publish(settings, [
            alice.as_voter(), bob.as_voter(),
            first, reused,
            # As bob, signed by mallory: would turn the vote around with bob's weight.
            mallory.sign(Vote(proposal_id="p1", voter_id="bob", support=False)),
            Vote(proposal_id="p1", voter_id="bob", support=False),  # unsigned
            # Dated 2100: once it tallied the proposal and scheduled activation for that year.
            bob.sign(Vote(proposal_id="p1", voter_id="bob", support=False,
                          created_at=datetime(2100, 1, 1, tzinfo=UTC))),
            alice.sign(Vote(proposal_id="p1", voter_id="alice", support=True)),
        ]))
        closing = _next_epoch()
        asyncio.run(publish(settings, [EpochTick(epoch=closing)]))
        # Tallies and activations are governance's alone, on their own topic.
        governance = _wait_for(settings, "governance-decisions", lambda events: any(
            isinstance(e, ParametersActivated) for e in events))
        # After the tally: the id stays used.
        asyncio.run(publish(settings, [Proposal(proposal_id="p1", proposer_id="mallory",
                                                epoch=closing + 1,
                                                changes=ParameterChanges(top_k=99))]))
        letters = _wait_for(settings, "dead-letters", lambda events: sum(
            "already used" in letter.reason for letter in events) >= 2)
        pipeline_process.wait_until(
            lambda: pipeline_process.consumed(settings, "governance", "governance-decisions"),
            "the ledger sink has every governance event", tmp_path / "pipeline.log")
    finally:
        pipeline.send_signal(signal.SIGTERM)
        try:
            pipeline.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.kill(pipeline.pid, signal.SIGKILL)
            pipeline.wait()

    (tallied,) = [e for e in governance if isinstance(e, ProposalTallied)]
    assert (tallied.yes_weight, tallied.no_weight, tallied.passed) == (600, 0, True)
    (activated,) = [e for e in governance if isinstance(e, ParametersActivated)]
    assert activated.effective_epoch == closing  # not in 2100
    assert activated.parameters.top_k == 4  # the first proposal's change
    assert activated.parameters.default_price_per_token == PRICE
    reasons = [letter.reason for letter in letters]
    assert sum("proposal id p1 is already used" in reason for reason in reasons) == 2
    assert any("vote as bob does not count" in reason and "does not verify" in reason
               for reason in reasons)
    assert any("vote as bob does not count: the event is not signed" in reason
               for reason in reasons)
    assert any("dated 2100" in reason for reason in reasons)

    shown = subprocess.run(ledger_probe.command("proposals"), env=env, cwd=tmp_path, check=True,
                           capture_output=True, text=True, timeout=120)
    (row,) = json.loads(shown.stdout.strip().splitlines()[-1])
    assert (row["proposal_id"], row["proposer_id"], row["status"]) == ("p1", "alice", "passed")
    assert json.loads(row["changes"]) == {"top_k": 4}
    assert (row["yes_weight"], row["no_weight"], row["activated_version"]) == (600, 0, 1)

