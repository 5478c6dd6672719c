"""The governance agent: proposals, votes and ticks on `governance`, the tallies and parameter
activations it decides on `governance-decisions`, and the tables the other agents read the
active parameters and vote weights from. Only the governance principal may write
`governance-decisions`, and a tally or an activation on `governance` does not decode (it goes
to the dead letters), so no one else can activate parameters.

`register(app, settings)` declares the topics, tables and agents on `app` and returns the
`GovernanceState` over the tables, the parameter source the attribution processor prices with.

- `parameter_history` (global table, version -> ParametersActivated JSON): every worker holds
  all of it; `parameters_for_epoch()` reads it.
- `earned-entries` (global table, reward entry id -> [beneficiary, epoch, micro-units]), fed
  by the `rewards` topic: vote weights are sums over it. Keyed by entry id, an entry read
  twice (redelivered after a SIGKILL, its offset not committed though its table update was, or
  published again) is stored once, so the weights equal the ledger.
- `open_proposals` (table, proposal id -> proposal and votes): the governance topic has one
  partition, so one agent instance sees every governance event in order.
- `used-proposal-ids` (table, proposal id -> True): every proposal id ever accepted, so a
  reused id is refused after its proposal closed too.
- `voter-keys` (table, voter id -> public key): the first key registered for each voter.

Every rule is `pipeline.governance`'s (the same functions fold the log for `governance show`);
an event they refuse (a reused proposal id, a vote that is unsigned, wrongly signed or on a
proposal that is not open, a second key for a voter, an event dated in the future) is
dead-lettered with the reason. Epochs come from the time the broker appended each event.

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

from infra.kafka.dead_letters import dead_letter
from infra.settings import Settings
from pipeline.app import registry_topic
from pipeline.governance import (
    OpenProposal,
    active_parameters,
    future_dated,
    proposal_refusal,
    record_vote,
    register_voter_key,
    tally_due,
    tick_epochs,
    vote_refusal,
)
from pipeline.rewards import epoch_of
from schemas.codec import DecodeError, decode, encode, parse_object
from schemas.events import (
    EpochTick,
    ParametersActivated,
    Proposal,
    ProposalTallied,
    RewardEntry,
    Vote,
    VoterKeyRegistered,
)
from schemas.topics import LOG_APPEND_TIME_TYPE, topic_name

CONSUMER = "governance"


class GovernanceState:
    """The governance tables of one app, and the parameters they say are in force (a
    `pipeline.attribution.parameters.ParameterSource`)."""

    def __init__(self, app: faust.App) -> None:
        self._app = app
        self.parameter_history = app.GlobalTable("parameter-history", default=None, partitions=1)
        self.earned_entries = app.GlobalTable("earned-entries", default=None)
        self.open_proposals = app.Table("open-proposals", default=None, partitions=1)
        self.used_proposal_ids = app.Table("used-proposal-ids", default=None, partitions=1)
        self.voter_keys = app.Table("voter-keys", default=None, partitions=1)

    def history(self) -> list[ParametersActivated]:
        return [
            ParametersActivated.model_validate_json(raw)
            for raw in self.parameter_history.values()
        ]

    def parameters_for_epoch(self, epoch: int) -> ParametersActivated:
        """The activation (version and parameters) in force at `epoch`."""
        return active_parameters(self.history(), epoch)

    async def ready(self) -> None:
        """Return once Faust has recovered the tables: before that the history may be empty."""
        await self._app.tables.recovery.completed.wait()

    def earnings_snapshot(self) -> dict[str, dict[int, int]]:
        """Micro-units earned per beneficiary per epoch: the vote weights."""
        earnings: dict[str, dict[int, int]] = {}
        for beneficiary, epoch, amount in self.earned_entries.values():
            per_epoch = earnings.setdefault(beneficiary, {})
            per_epoch[epoch] = per_epoch.get(epoch, 0) + amount
        return earnings

    def open_snapshot(self) -> dict[str, OpenProposal]:
        return {
            proposal_id: OpenProposal(Proposal.model_validate_json(state["proposal"]),
                                      dict(state["votes"]))
            for proposal_id, state in self.open_proposals.items()
            if state is not None
        }

    def store_open(self, entry: OpenProposal) -> None:
        self.open_proposals[entry.proposal.proposal_id] = {
            "proposal": entry.proposal.model_dump_json(),
            "votes": entry.votes,
        }


def register(app: faust.App, settings: Settings) -> GovernanceState:
    """Declare governance's topics, tables and agents on `app`."""
    decisions_topic = registry_topic(app, "governance-decisions", settings.topic_prefix)
    logical = {topic_name(name, settings.topic_prefix): name
               for name in ("governance", "governance-decisions")}
    # Both topics have one partition: one agent instance sees every governance event.
    governance_channel = app.topic(
        *logical, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw"
    )
    rewards_topic = registry_topic(app, "rewards", settings.topic_prefix)
    dead_letters = registry_topic(app, "dead-letters", settings.topic_prefix)
    state = GovernanceState(app)

    async def _dead_letter(event: faust.EventT, reason: str) -> None:
        message = event.message
        letter = dead_letter(
            event.value, source_topic=message.topic, partition=message.partition,
            offset=message.offset, consumer=CONSUMER, reason=reason,
        )
        await dead_letters.send(key=letter.key, value=encode(letter.event))

    async def _tally_before(
        now_epoch: int, at: datetime, activate_from: int | None = None
    ) -> None:
        pending = state.open_snapshot()
        if not any(entry.proposal.epoch < now_epoch for entry in pending.values()):
            return
        emitted = tally_due(pending, state.history(), state.earnings_snapshot(), now_epoch, at,
                            activate_from=activate_from)
        for produced in emitted:
            if isinstance(produced, ProposalTallied):
                state.open_proposals.pop(produced.proposal_id, None)
            else:
                state.parameter_history[str(produced.version)] = produced.model_dump_json()
            await decisions_topic.send(
                key=(produced.proposal_id or "").encode(), value=encode(produced)
            )

    def _refusal(decoded: object, payload: dict, appended_at: datetime) -> str | None:
        """Apply one governance event to the tables; the reason when it is refused."""
        if isinstance(decoded, ProposalTallied | ParametersActivated | EpochTick):
            return None
        stale = future_dated(decoded.created_at, appended_at)  # type: ignore[attr-defined]
        if stale is not None:
            return stale
        if isinstance(decoded, VoterKeyRegistered):
            return register_voter_key(state.voter_keys, decoded)
        if isinstance(decoded, Proposal):
            refused = proposal_refusal(decoded, state.used_proposal_ids)
            if refused is None:
                state.used_proposal_ids[decoded.proposal_id] = True
                state.store_open(OpenProposal(decoded))
            return refused
        assert isinstance(decoded, Vote)
        refused = vote_refusal(decoded, payload, state.open_proposals, state.voter_keys)
        if refused is None:
            stored = state.open_proposals[decoded.proposal_id]
            target = {decoded.proposal_id: OpenProposal(
                Proposal.model_validate_json(stored["proposal"]), dict(stored["votes"]))}
            record_vote(target, decoded)
            state.store_open(target[decoded.proposal_id])
        return refused

    @app.agent(governance_channel, name="governance")
    async def govern(stream: faust.StreamT) -> None:
        async for event in stream.events():
            try:
                decoded = decode(logical[event.message.topic], event.value)
            except DecodeError as exc:
                await _dead_letter(event, exc.reason)
                continue
            # Decisions are this agent's own; what anyone else submits is dated by the broker.
            if (
                logical[event.message.topic] == "governance"
                and event.message.timestamp_type != LOG_APPEND_TIME_TYPE
            ):
                await _dead_letter(event, (
                    "refused: the broker did not stamp this event's time (`governance` needs "
                    "message.timestamp.type=LogAppendTime: run `loraledger stack up`)"))
                continue
            appended_at = datetime.fromtimestamp(event.message.timestamp, UTC)
            if isinstance(decoded, EpochTick):
                close_before, activate_from = tick_epochs(
                    decoded, appended_at, settings.epoch_seconds
                )
                await _tally_before(close_before, appended_at, activate_from)
                continue
            await _tally_before(epoch_of(appended_at, settings.epoch_seconds), appended_at)
            refused = _refusal(decoded, parse_object(event.value), appended_at)
            if refused is not None:
                await _dead_letter(event, f"refused: {refused}")
            elif (
                isinstance(decoded, ParametersActivated)
                and str(decoded.version) not in state.parameter_history
            ):
                # Our own activations come back here; keep the first record of each version.
                state.parameter_history[str(decoded.version)] = decoded.model_dump_json()
            # ProposalTallied: the tally that emitted it already closed the proposal.

    @app.agent(rewards_topic, name="governance-earnings")
    async def track_earnings(stream: faust.StreamT) -> None:
        async for event in stream.events():
            try:
                entry: RewardEntry = decode("rewards", event.value)
            except DecodeError as exc:
                await _dead_letter(event, exc.reason)
                continue
            # A plain store, never a read-modify-write: storing an entry again changes nothing.
            state.earned_entries[entry.entry_id] = [entry.beneficiary_id, entry.epoch,
                                                    entry.amount]

    return state
