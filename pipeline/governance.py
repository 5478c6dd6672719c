"""Governance rules as pure functions over plain state, so the agent, the CLI and the tests
share one implementation.

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

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

from pipeline.rewards import TREASURY_ID, epoch_of
from schemas.events import (
    EpochTick,
    ParameterChanges,
    Parameters,
    ParametersActivated,
    Proposal,
    ProposalTallied,
    Vote,
)

QUORUM_PPM = 100_000  # 10% of the voting weight that existed before the proposal's epoch

GENESIS = ParametersActivated(
    version=0,
    effective_epoch=0,
    parameters=Parameters(),
    created_at=datetime(1970, 1, 1, tzinfo=UTC),
)

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
                "min_weight_ppm": min_weight_ppm, "default_price_per_token": default_price}
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


def tick_epochs(tick: EpochTick, epoch_seconds: int) -> tuple[int, int]:
    """(close epochs before, activate from) for a tick: its epoch, capped by the epoch of its
    timestamp so a tick from the future closes nothing early, and its timestamp's epoch."""
    stamped = epoch_of(tick.created_at, epoch_seconds)
    return min(tick.epoch, stamped), stamped


def fold_log(
    events: list[Proposal | Vote | ProposalTallied | ParametersActivated | EpochTick],
) -> GovernanceView:
    """Fold governance events (in log order) into the state the agent holds; ticks change
    nothing by themselves (the tallies they cause are events of their own)."""
    view = GovernanceView()
    for event in events:
        if isinstance(event, EpochTick):
            continue
        if isinstance(event, Proposal):
            if event.proposal_id not in view.tallies:
                view.open_proposals.setdefault(event.proposal_id, OpenProposal(event))
        elif isinstance(event, Vote):
            record_vote(view.open_proposals, event)
        elif isinstance(event, ProposalTallied):
            view.tallies[event.proposal_id] = event
            view.open_proposals.pop(event.proposal_id, None)
        elif all(known.version != event.version for known in view.history):
            view.history.append(event)
    return view
