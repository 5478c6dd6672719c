"""The governance agent: proposals, votes and ticks on `governance`, the tallies and parameter
activations it decides on `governance-decisions`, and the tables the other agents read the
active parameters and vote weights from. Only the governance principal may write
`governance-decisions`, and a tally or an activation on `governance` does not decode (it goes
to the dead letters), so no one else can activate parameters.

- `parameter_history` (global table, version -> ParametersActivated JSON): every worker holds
  all of it; `current_parameters()` and `parameters_for_epoch()` read it.
- `earnings` (global table, beneficiary -> {epoch: micro-units}), fed by the `rewards` topic:
  vote weights. The rewards topic is written exactly once (transactions), so summing it is
  exact.
- `open_proposals` (table, proposal id -> proposal and votes): the governance topic has one
  partition, so one agent instance sees every governance event in order.

Tallies run when the first governance event from a later epoch arrives (a proposal, a vote,
an activation published after the epoch ended, or an EpochTick, which exists for this: a tick
published at epoch boundaries tallies proposals when there is no other traffic; a tick's epoch
is capped by its timestamp's). The events they cause go onto
`governance-decisions`, which this agent reads too, and the activation is recorded in the
history at once so that a second tally before it comes back cannot reuse its version number.
"""

from __future__ import annotations

from datetime import UTC, datetime

import faust

from pipeline.app import app, settings, topic
from pipeline.governance import (
    OpenProposal,
    active_parameters,
    record_vote,
    tally_due,
    tick_epochs,
)
from pipeline.rewards import epoch_of
from schemas.codec import DecodeError, decode, encode
from schemas.events import (
    DeadLetter,
    EpochTick,
    Parameters,
    ParametersActivated,
    Proposal,
    ProposalTallied,
    RewardEntry,
    Vote,
)
from schemas.topics import topic_name

CONSUMER = "governance"

decisions_topic = topic("governance-decisions")
_logical = {topic_name(name, settings.topic_prefix): name
            for name in ("governance", "governance-decisions")}
# Both topics have one partition: one agent instance sees every governance event.
governance_channel = app.topic(
    *_logical, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw"
)
rewards_topic = topic("rewards")
dead_letters = topic("dead-letters")

parameter_history = app.GlobalTable("parameter-history", default=None, partitions=1)
earnings = app.GlobalTable("earnings", default=None)
open_proposals = app.Table("open-proposals", default=None, partitions=1)


def history() -> list[ParametersActivated]:
    return [ParametersActivated.model_validate_json(raw) for raw in parameter_history.values()]


def parameters_for_epoch(epoch: int) -> ParametersActivated:
    """The activation (version and parameters) in force at `epoch`."""
    return active_parameters(history(), epoch)


def current_parameters() -> Parameters:
    """The parameters in force now, for the attribution agent."""
    return parameters_for_epoch(epoch_of(datetime.now(UTC), settings.epoch_seconds)).parameters


def _earnings_snapshot() -> dict[str, dict[int, int]]:
    return {
        beneficiary: {int(epoch): amount for epoch, amount in (per_epoch or {}).items()}
        for beneficiary, per_epoch in earnings.items()
    }


def _open_snapshot() -> dict[str, OpenProposal]:
    return {
        proposal_id: OpenProposal(Proposal.model_validate_json(state["proposal"]),
                                  dict(state["votes"]))
        for proposal_id, state in open_proposals.items()
        if state is not None
    }


def _store_open(entry: OpenProposal) -> None:
    open_proposals[entry.proposal.proposal_id] = {
        "proposal": entry.proposal.model_dump_json(),
        "votes": entry.votes,
    }


async def _dead_letter(event: faust.EventT, reason: str) -> None:
    message = event.message
    letter = DeadLetter.for_bytes(
        event.value or b"", source_topic=message.topic, partition=message.partition,
        offset=message.offset, consumer=CONSUMER, reason=reason,
    )
    await dead_letters.send(key=message.topic.encode(), value=encode(letter))


async def _tally_before(now_epoch: int, at: datetime, activate_from: int | None = None) -> None:
    pending = _open_snapshot()
    if not any(entry.proposal.epoch < now_epoch for entry in pending.values()):
        return
    emitted = tally_due(pending, history(), _earnings_snapshot(), now_epoch, at,
                        activate_from=activate_from)
    for produced in emitted:
        if isinstance(produced, ProposalTallied):
            open_proposals.pop(produced.proposal_id, None)
        else:
            parameter_history[str(produced.version)] = produced.model_dump_json()
        await decisions_topic.send(
            key=(produced.proposal_id or "").encode(), value=encode(produced)
        )


@app.agent(governance_channel, name="governance")
async def govern(stream: faust.StreamT) -> None:
    async for event in stream.events():
        try:
            decoded = decode(_logical[event.message.topic], event.value)
        except DecodeError as exc:
            await _dead_letter(event, exc.reason)
            continue
        if isinstance(decoded, EpochTick):
            close_before, activate_from = tick_epochs(decoded, settings.epoch_seconds)
            await _tally_before(close_before, decoded.created_at, activate_from)
            continue
        now_epoch = epoch_of(decoded.created_at, settings.epoch_seconds)
        await _tally_before(now_epoch, decoded.created_at)
        if isinstance(decoded, Proposal):
            if decoded.proposal_id not in open_proposals:
                _store_open(OpenProposal(decoded))
        elif isinstance(decoded, Vote):
            state = open_proposals.get(decoded.proposal_id)
            if state is not None:
                target = {decoded.proposal_id: OpenProposal(
                    Proposal.model_validate_json(state["proposal"]), dict(state["votes"]))}
                record_vote(target, decoded)
                _store_open(target[decoded.proposal_id])
        elif (
            isinstance(decoded, ParametersActivated)
            and str(decoded.version) not in parameter_history
        ):
            # Our own activations come back here; keep the first record of each version.
            parameter_history[str(decoded.version)] = decoded.model_dump_json()
        # ProposalTallied: the tally that emitted it already closed the proposal.


@app.agent(rewards_topic, name="governance-earnings")
async def track_earnings(stream: faust.StreamT) -> None:
    async for event in stream.events():
        try:
            entry: RewardEntry = decode("rewards", event.value)
        except DecodeError as exc:
            await _dead_letter(event, exc.reason)
            continue
        per_epoch = dict(earnings.get(entry.beneficiary_id) or {})
        key = str(entry.epoch)
        per_epoch[key] = per_epoch.get(key, 0) + entry.amount
        earnings[entry.beneficiary_id] = per_epoch
