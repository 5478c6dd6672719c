"""Governance rules as pure functions over plain state, so the agent, the CLI and the tests
share one implementation.

- Time is the broker's: every epoch here is that of the time the broker appended an event to
  `governance` (the topic has log-append timestamps), never an event's `created_at`, which its
  producer chose. An event dated more than MAX_CLOCK_SKEW after the broker appended it is
  refused outright.
- A vote counts only for the voter that signed it: its Ed25519 signature must verify against
  the first key registered for its voter id (`VoterKeyRegistered`, earlier in the log); a
  later registration of another key for the same id is refused. An unsigned or wrongly signed
  vote counts for nobody.
- A proposal id is used once: a proposal reusing the id of any earlier one, open or tallied,
  is refused (the ledger keeps the first row of an id, so both views agree).
- A vote on a proposal that is not open (unknown, or closed because its epoch ended by broker
  time) counts nowhere.
- Refused events are dead-lettered with the reason by the agent, and skipped by `fold_log`.
- Parameters have versions. Version 0 is the schema's defaults, effective from epoch 0. The
  active parameters for an epoch are the highest version whose effective epoch is <= it.
- A vote's weight is the voter's rewards earned in epochs before the proposal's epoch; the
  treasury never votes. A voter's latest vote before the tally counts.
- A proposal is tallied once its epoch has ended: on the first governance event from a later
  epoch. An EpochTick is such an event with no other effect, so an operator or a cron job can
  close epochs when nobody proposes or votes (`loraledger governance tick`). A tick closes the
  epochs before min(its epoch, the epoch of its timestamp): a tick claiming a future epoch
  cannot close an epoch still running. A proposal passes when yes weight > no weight and the
  weight that voted reaches the quorum: QUORUM_PPM of all voting weight that existed (rewards
  earned by anyone but the treasury in epochs before the proposal's). With no rewards earned
  yet, nothing passes.
- A passed proposal activates at the first epoch after its tally: max(proposal epoch + 1,
  epoch of the tally's timestamp), as version latest + 1, so a tick for an old epoch never
  activates parameters retroactively. Proposals tallied together apply in order of
  (epoch, creation time, id), each on top of the previous.
"""

from __future__ import annotations

from collections.abc import Container, Mapping, MutableMapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from pipeline.rewards import TREASURY_ID, epoch_of
from schemas.events import (
    EpochTick,
    ParameterChanges,
    Parameters,
    ParametersActivated,
    Proposal,
    ProposalTallied,
    Vote,
    VoterKeyRegistered,
)
from schemas.signatures import signature_problem

QUORUM_PPM = 100_000  # 10% of the voting weight that existed before the proposal's epoch

GENESIS = ParametersActivated(
    version=0,
    effective_epoch=0,
    parameters=Parameters(),
    created_at=datetime(1970, 1, 1, tzinfo=UTC),
)

# How far ahead of the broker's clock an event's own timestamp may be before it is refused.
MAX_CLOCK_SKEW = timedelta(minutes=5)

# Earnings: beneficiary -> epoch -> micro-units earned in that epoch.
Earnings = Mapping[str, Mapping[int, int]]


@dataclass
class OpenProposal:
    proposal: Proposal
    votes: dict[str, bool] = field(default_factory=dict)


def active_parameters(history: list[ParametersActivated], epoch: int) -> ParametersActivated:
    """The activation in force at `epoch` (GENESIS when nothing has activated yet)."""
    best = GENESIS
    for activation in history:
        if activation.effective_epoch <= epoch and activation.version >= best.version:
            best = activation
    return best


def latest_version(history: list[ParametersActivated]) -> ParametersActivated:
    return max(history, key=lambda activation: activation.version, default=GENESIS)


def vote_weight(earnings: Earnings, voter: str, before_epoch: int) -> int:
    if voter == TREASURY_ID:
        return 0
    return sum(amount for epoch, amount in earnings.get(voter, {}).items() if epoch < before_epoch)


def total_weight(earnings: Earnings, before_epoch: int) -> int:
    return sum(vote_weight(earnings, voter, before_epoch) for voter in earnings)


def record_vote(open_proposals: dict[str, OpenProposal], vote: Vote) -> bool:
    """Record a vote on an open proposal; False (ignored) when the proposal is unknown or
    already tallied."""
    target = open_proposals.get(vote.proposal_id)
    if target is None:
        return False
    target.votes[vote.voter_id] = vote.support
    return True


def future_dated(created_at: datetime, appended_at: datetime) -> str | None:
    """Why an event is refused for its date: stamped later than the broker appended it."""
    if created_at > appended_at + MAX_CLOCK_SKEW:
        return (f"dated {created_at.isoformat()}, after the broker appended it at "
                f"{appended_at.isoformat()}")
    return None


def register_voter_key(keys: MutableMapping[str, str], event: VoterKeyRegistered) -> str | None:
    """Record a voter's key; the reason it is refused when the voter already has another."""
    known = keys.get(event.voter_id)
    if known is None:
        keys[event.voter_id] = event.public_key
    elif known != event.public_key:
        return f"voter {event.voter_id} already has a registered key"
    return None


def proposal_refusal(proposal: Proposal, used_ids: Container[str]) -> str | None:
    if proposal.proposal_id in used_ids:
        return f"proposal id {proposal.proposal_id} is already used"
    return None


def vote_refusal(
    vote: Vote,
    payload: Mapping[str, Any],
    open_ids: Container[str],
    voter_keys: Mapping[str, str],
) -> str | None:
    """Why `vote` (sent as the JSON object `payload`) counts for nobody; None when it counts."""
    if vote.proposal_id not in open_ids:
        return f"proposal {vote.proposal_id} is not open (unknown, or its epoch has ended)"
    problem = signature_problem(payload, voter_keys.get(vote.voter_id))
    if problem is not None:
        return f"vote as {vote.voter_id} does not count: {problem}"
    return None


def tally(open_proposal: OpenProposal, earnings: Earnings, at: datetime) -> ProposalTallied:
    proposal = open_proposal.proposal
    yes = no = 0
    for voter, support in sorted(open_proposal.votes.items()):
        weight = vote_weight(earnings, voter, proposal.epoch)
        if support:
            yes += weight
        else:
            no += weight
    eligible = total_weight(earnings, proposal.epoch)
    quorum_met = eligible > 0 and (yes + no) * 1_000_000 >= eligible * QUORUM_PPM
    return ProposalTallied(
        proposal_id=proposal.proposal_id,
        epoch=proposal.epoch,
        yes_weight=yes,
        no_weight=no,
        passed=quorum_met and yes > no,
        created_at=at,
    )


def tally_due(
    open_proposals: dict[str, OpenProposal],
    history: list[ParametersActivated],
    earnings: Earnings,
    now_epoch: int,
    at: datetime,
    *,
    activate_from: int | None = None,
) -> list[ProposalTallied | ParametersActivated]:
    """Tally every open proposal whose epoch ended before `now_epoch` and activate the passed
    ones from max(proposal epoch + 1, `activate_from`) (default `now_epoch`); removes them from
    `open_proposals`. Returns the events to publish, in order."""
    floor = now_epoch if activate_from is None else activate_from
    due = sorted(
        (entry for entry in open_proposals.values() if entry.proposal.epoch < now_epoch),
        key=lambda entry: (entry.proposal.epoch, entry.proposal.created_at,
                           entry.proposal.proposal_id),
    )
    emitted: list[ProposalTallied | ParametersActivated] = []
    latest = latest_version(history)
    for entry in due:
        result = tally(entry, earnings, at)
        emitted.append(result)
        del open_proposals[entry.proposal.proposal_id]
        if not result.passed:
            continue
        latest = ParametersActivated(
            version=latest.version + 1,
            effective_epoch=max(entry.proposal.epoch + 1, floor),
            parameters=entry.proposal.changes.apply(latest.parameters),
            proposal_id=entry.proposal.proposal_id,
            created_at=at,
        )
        emitted.append(latest)
    return emitted


def changes_from_options(
    *,
    fee_split: tuple[int, int, int, int] | None = None,
    top_k: int | None = None,
    gradient_weight_ppm: int | None = None,
    lexical_weight_ppm: int | None = None,
    min_weight_ppm: int | None = None,
    prices: Mapping[str, int] | None = None,
    default_price: int | None = None,
) -> ParameterChanges:
    """ParameterChanges from command-line style options (validated by the schema)."""
    values: dict[str, object] = {}
    if fee_split is not None:
        contributors, owner, operator, treasury = fee_split
        values["fee_split"] = {"contributors": contributors, "adapter_owner": owner,
                               "compute_operator": operator, "treasury": treasury}
    optional = {"top_k": top_k, "gradient_weight_ppm": gradient_weight_ppm,
                "lexical_weight_ppm": lexical_weight_ppm, "min_weight_ppm": min_weight_ppm,
                "default_price_per_token": default_price}
    values.update({name: value for name, value in optional.items() if value is not None})
    if prices:
        values["adapter_prices"] = dict(prices)
    return ParameterChanges.model_validate(values)


@dataclass
class GovernanceView:
    """The governance log folded into its current state, as `governance show` prints it."""

    history: list[ParametersActivated] = field(default_factory=list)
    open_proposals: dict[str, OpenProposal] = field(default_factory=dict)
    tallies: dict[str, ProposalTallied] = field(default_factory=dict)


def tick_epochs(tick: EpochTick, appended_at: datetime, epoch_seconds: int) -> tuple[int, int]:
    """(close epochs before, activate from) for a tick the broker appended at `appended_at`:
    its epoch, capped by the broker's epoch so a tick from the future closes nothing early,
    and the broker's epoch."""
    stamped = epoch_of(appended_at, epoch_seconds)
    return min(tick.epoch, stamped), stamped


@dataclass(frozen=True)
class Logged:
    """A governance event as read from the log: the JSON object it was sent as (what a
    signature covers) and the time the broker appended it."""

    event: Proposal | Vote | ProposalTallied | ParametersActivated | EpochTick | VoterKeyRegistered
    payload: Mapping[str, Any]
    appended_at: datetime


def fold_log(logged: list[Logged], epoch_seconds: int) -> GovernanceView:
    """Fold governance events (in log order) into the state the agent holds, refusing what
    it refuses; ticks change nothing by themselves (the tallies they cause are events of their
    own), but like every event they close the proposals of epochs that have ended."""
    view = GovernanceView()
    used_ids: set[str] = set()
    voter_keys: dict[str, str] = {}
    for item in logged:
        event = item.event
        if isinstance(event, EpochTick):
            close_before, _ = tick_epochs(event, item.appended_at, epoch_seconds)
        else:
            close_before = epoch_of(item.appended_at, epoch_seconds)
        # Every event closes the proposals of ended epochs, as in the agent, which tallies
        # them then; their tallies follow in the log.
        for proposal_id, entry in list(view.open_proposals.items()):
            if entry.proposal.epoch < close_before:
                del view.open_proposals[proposal_id]
        if isinstance(event, ProposalTallied):
            view.tallies[event.proposal_id] = event
        elif isinstance(event, ParametersActivated):
            if all(known.version != event.version for known in view.history):
                view.history.append(event)
        elif isinstance(event, EpochTick) or future_dated(event.created_at, item.appended_at):
            continue
        elif isinstance(event, VoterKeyRegistered):
            register_voter_key(voter_keys, event)
        elif isinstance(event, Proposal):
            if proposal_refusal(event, used_ids) is None:
                used_ids.add(event.proposal_id)
                view.open_proposals[event.proposal_id] = OpenProposal(event)
        elif vote_refusal(event, item.payload, view.open_proposals, voter_keys) is None:
            record_vote(view.open_proposals, event)
    return view
