"""Governance rules: weighted votes, quorum, tallies at epoch end, versioned activations."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
import typer
from signing import Identity

from loraledger.commands.governance import build_tick, parse_fee_split, parse_prices
from pipeline.governance import (
    GENESIS,
    Logged,
    OpenProposal,
    active_parameters,
    changes_from_options,
    fold_log,
    record_vote,
    tally_due,
    tick_epochs,
    vote_refusal,
    vote_weight,
)
from pipeline.rewards import TREASURY_ID, epoch_of
from schemas.events import (
    EpochTick,
    ParameterChanges,
    ParametersActivated,
    Proposal,
    ProposalTallied,
    Vote,
)
from schemas.signatures import event_payload

AT = datetime(2026, 5, 1, tzinfo=UTC)
EARNINGS = {
    "alice": {1: 600, 2: 100, 5: 1_000_000},  # epoch 5 is not before the proposals' epoch
    "bob": {2: 300},
    "carol": {1: 50},
    TREASURY_ID: {1: 10_000},
}


def proposal(pid: str, epoch: int = 5, **changes) -> Proposal:
    return Proposal(
        proposal_id=pid,
        proposer_id="alice",
        epoch=epoch,
        changes=ParameterChanges(**(changes or {"top_k": 4})),
        created_at=AT,
    )


def vote(pid: str, voter: str, support: bool) -> Vote:
    return Vote(proposal_id=pid, voter_id=voter, support=support, created_at=AT)


def test_vote_weight_counts_only_earlier_epochs_and_never_the_treasury():
    assert vote_weight(EARNINGS, "alice", 5) == 700
    assert vote_weight(EARNINGS, "alice", 2) == 600
    assert vote_weight(EARNINGS, "nobody", 5) == 0
    assert vote_weight(EARNINGS, TREASURY_ID, 5) == 0


def test_weighted_majority_passes_and_activates_next_epoch_as_next_version():
    pending = {"p1": OpenProposal(proposal("p1"))}
    record_vote(pending, vote("p1", "alice", True))
    record_vote(pending, vote("p1", "bob", False))
    emitted = tally_due(pending, [], EARNINGS, now_epoch=6, at=AT)
    tallied, activated = emitted
    assert isinstance(tallied, ProposalTallied)
    assert (tallied.yes_weight, tallied.no_weight, tallied.passed) == (700, 300, True)
    assert isinstance(activated, ParametersActivated)
    assert (activated.version, activated.effective_epoch) == (1, 6)
    assert activated.parameters.top_k == 4
    assert pending == {}


def test_majority_by_count_but_not_by_weight_fails():
    pending = {"p1": OpenProposal(proposal("p1"))}
    record_vote(pending, vote("p1", "bob", True))
    record_vote(pending, vote("p1", "carol", True))
    record_vote(pending, vote("p1", "alice", False))
    (tallied,) = tally_due(pending, [], EARNINGS, now_epoch=6, at=AT)
    assert not tallied.passed


def test_quorum_is_required():
    # carol's 50 of 1050 eligible is under 10%.
    pending = {"p1": OpenProposal(proposal("p1"))}
    record_vote(pending, vote("p1", "carol", True))
    (tallied,) = tally_due(pending, [], EARNINGS, now_epoch=6, at=AT)
    assert tallied.yes_weight == 50 and not tallied.passed


def test_latest_vote_counts_and_votes_on_unknown_proposals_are_ignored():
    pending = {"p1": OpenProposal(proposal("p1"))}
    record_vote(pending, vote("p1", "alice", False))
    record_vote(pending, vote("p1", "alice", True))
    assert not record_vote(pending, vote("nope", "alice", True))
    (tallied, _) = tally_due(pending, [], EARNINGS, now_epoch=6, at=AT)
    assert (tallied.yes_weight, tallied.no_weight) == (700, 0)


def test_nothing_is_tallied_before_its_epoch_ends():
    pending = {"p1": OpenProposal(proposal("p1", epoch=5))}
    assert tally_due(pending, [], EARNINGS, now_epoch=5, at=AT) == []
    assert "p1" in pending


def test_two_passed_proposals_stack_in_order():
    first = proposal("p1", top_k=4)
    second = Proposal(
        proposal_id="p0",
        proposer_id="bob",
        epoch=5,
        changes=ParameterChanges(default_price_per_token=99),
        created_at=AT.replace(hour=1),
    )
    pending = {"p1": OpenProposal(first), "p0": OpenProposal(second)}
    for pid in pending:
        record_vote(pending, vote(pid, "alice", True))
    emitted = tally_due(pending, [], EARNINGS, now_epoch=9, at=AT)
    activations = [e for e in emitted if isinstance(e, ParametersActivated)]
    assert [a.proposal_id for a in activations] == ["p1", "p0"]
    assert [a.version for a in activations] == [1, 2]
    assert all(a.effective_epoch == 9 for a in activations)  # tallied late: no retroactivity
    assert activations[1].parameters.top_k == 4
    assert activations[1].parameters.default_price_per_token == 99


def test_active_parameters_by_epoch():
    v1 = ParametersActivated(
        version=1,
        effective_epoch=10,
        parameters=ParameterChanges(top_k=2).apply(GENESIS.parameters),
    )
    assert active_parameters([v1], 9) == GENESIS
    assert active_parameters([v1], 10).version == 1


# Epochs of the folded logs below: AT falls in epoch 5.
FOLD_EPOCH_SECONDS = int(AT.timestamp()) // 5
ALICE, BOB = Identity.new("alice"), Identity.new("bob")


def at_fold_epoch(epoch: int) -> datetime:
    return datetime.fromtimestamp(epoch * FOLD_EPOCH_SECONDS, UTC)


def logged(event, epoch: int = 5) -> Logged:
    """`event` as the broker appended it in `epoch` (of FOLD_EPOCH_SECONDS)."""
    return Logged(event, event_payload(event), at_fold_epoch(epoch))


def signed_vote(pid: str, voter: Identity, support: bool) -> Vote:
    return voter.sign(vote(pid, voter.name, support))


def test_fold_log_matches_agent_state():
    p1 = proposal("p1")
    tallied = ProposalTallied(proposal_id="p1", epoch=5, yes_weight=1, no_weight=0, passed=True)
    activated = ParametersActivated(
        version=1,
        effective_epoch=6,
        parameters=p1.changes.apply(GENESIS.parameters),
        proposal_id="p1",
    )
    p2 = proposal("p2", epoch=6)
    view = fold_log(
        [
            logged(ALICE.as_voter(AT)),
            logged(BOB.as_voter(AT)),
            logged(p1),
            logged(signed_vote("p1", ALICE, True)),
            logged(tallied, 6),
            logged(activated, 6),
            logged(activated, 6),
            logged(p2, 6),
            logged(signed_vote("p2", BOB, False), 6),
            logged(signed_vote("p1", BOB, True), 6),
        ],
        FOLD_EPOCH_SECONDS,
    )
    assert list(view.open_proposals) == ["p2"]
    assert view.open_proposals["p2"].votes == {"bob": False}
    assert [a.version for a in view.history] == [1]
    assert view.tallies["p1"].passed


def test_a_vote_counts_only_when_signed_by_the_voters_registered_key():
    mallory = Identity.new("mallory")
    keys = {"alice": ALICE.public_key}
    payload = event_payload
    honest = signed_vote("p1", ALICE, True)
    assert vote_refusal(honest, payload(honest), {"p1"}, keys) is None
    unsigned = vote("p1", "alice", True)
    assert "not signed" in vote_refusal(unsigned, payload(unsigned), {"p1"}, keys)
    impersonated = mallory.sign(vote("p1", "alice", True))
    assert "does not verify" in vote_refusal(impersonated, payload(impersonated), {"p1"}, keys)
    altered = payload(honest) | {"support": False}
    assert "does not verify" in vote_refusal(honest, altered, {"p1"}, keys)
    stranger = mallory.sign(vote("p1", "mallory", True))
    assert "no key is registered" in vote_refusal(stranger, payload(stranger), {"p1"}, keys)
    assert "not open" in vote_refusal(honest, payload(honest), {"p2"}, keys)


def test_fold_log_counts_no_impersonated_unsigned_late_or_future_dated_vote():
    mallory = Identity.new("mallory")
    view = fold_log(
        [
            logged(ALICE.as_voter(AT)),
            logged(mallory.as_voter(AT)),
            logged(Identity.new("alice").as_voter(AT)),  # a second key for alice: refused
            logged(proposal("p1")),
            logged(proposal("p2", epoch=6)),
            logged(mallory.sign(vote("p1", "alice", False))),
            logged(vote("p1", "alice", False)),
            logged(mallory.sign(Vote(proposal_id="p2", voter_id="mallory", support=True,
                                     created_at=datetime(2100, 1, 1, tzinfo=UTC)))),
            logged(signed_vote("p1", ALICE, True)),
            logged(mallory.sign(vote("p1", "mallory", False)), 6),  # p1's epoch has ended
        ],
        FOLD_EPOCH_SECONDS,
    )
    assert list(view.open_proposals) == ["p2"]
    assert view.open_proposals["p2"].votes == {}


def test_a_reused_proposal_id_is_refused_while_open_and_after_its_tally():
    first, reused = proposal("p1"), proposal("p1", top_k=99)
    tallied = ProposalTallied(proposal_id="p1", epoch=5, yes_weight=0, no_weight=0, passed=False)
    view = fold_log([logged(first), logged(reused)], FOLD_EPOCH_SECONDS)
    assert view.open_proposals["p1"].proposal == first
    view = fold_log([logged(first), logged(tallied, 6), logged(proposal("p1", epoch=7), 6)],
                    FOLD_EPOCH_SECONDS)
    assert view.open_proposals == {} and list(view.tallies) == ["p1"]


def test_changes_from_options_validates_through_the_schema():
    changes = changes_from_options(fee_split=(4000, 3000, 2000, 1000), prices={"ad": 5}, top_k=8)
    assert changes.fee_split.contributors == 4000
    assert changes.adapter_prices == {"ad": 5}
    with pytest.raises(ValueError, match="10000"):
        changes_from_options(fee_split=(1, 2, 3, 4))
    with pytest.raises(ValueError, match="at least one"):
        changes_from_options()


def test_cli_option_parsing_errors_are_one_line():
    assert parse_fee_split("5000,2500,1500,1000") == (5000, 2500, 1500, 1000)
    assert parse_prices(["ad-1=7"]) == {"ad-1": 7}
    with pytest.raises(typer.BadParameter, match="C,O,W,T"):
        parse_fee_split("1,2")
    with pytest.raises(typer.BadParameter, match="ADAPTER="):
        parse_prices(["ad-1"])
    with pytest.raises(typer.BadParameter, match="invalid adapter id"):
        parse_prices(["../x=3"])


EPOCH_SECONDS = 3600


def at_epoch(epoch: int) -> datetime:
    return datetime.fromtimestamp(epoch * EPOCH_SECONDS, UTC)


def test_a_tick_tallies_proposals_of_earlier_epochs_only():
    pending = {
        "p5": OpenProposal(proposal("p5", epoch=5)),
        "p6": OpenProposal(proposal("p6", epoch=6, default_price_per_token=2)),
    }
    record_vote(pending, vote("p5", "alice", True))
    close_before, activate_from = tick_epochs(EpochTick(epoch=6), at_epoch(6), EPOCH_SECONDS)
    assert (close_before, activate_from) == (6, 6)
    emitted = tally_due(pending, [], EARNINGS, close_before, at_epoch(6),
                        activate_from=activate_from)
    assert [type(e) for e in emitted] == [ProposalTallied, ParametersActivated]
    assert emitted[0].proposal_id == "p5" and emitted[1].effective_epoch == 6
    assert list(pending) == ["p6"]


def test_a_late_tick_for_an_old_epoch_activates_from_its_own_time_not_retroactively():
    pending = {"p5": OpenProposal(proposal("p5", epoch=5))}
    record_vote(pending, vote("p5", "alice", True))
    close_before, activate_from = tick_epochs(EpochTick(epoch=6), at_epoch(9), EPOCH_SECONDS)
    assert (close_before, activate_from) == (6, 9)
    _, activated = tally_due(pending, [], EARNINGS, close_before, at_epoch(9),
                             activate_from=activate_from)
    assert activated.effective_epoch == 9


def test_a_tick_from_the_future_closes_nothing_early():
    pending = {"p5": OpenProposal(proposal("p5", epoch=5))}
    # Dated in epoch 99 by its sender, appended by the broker in epoch 5.
    tick = EpochTick(epoch=99, created_at=at_epoch(99))
    close_before, _ = tick_epochs(tick, at_epoch(5), EPOCH_SECONDS)
    assert close_before == 5
    assert tally_due(pending, [], EARNINGS, close_before, at_epoch(5)) == []
    assert "p5" in pending


def test_fold_log_ignores_ticks_from_the_future():
    p1 = proposal("p1")
    view = fold_log(
        [logged(BOB.as_voter(AT)), logged(p1), logged(EpochTick(epoch=9)),
         logged(signed_vote("p1", BOB, True))],
        FOLD_EPOCH_SECONDS,
    )
    assert list(view.open_proposals) == ["p1"]
    assert view.open_proposals["p1"].votes == {"bob": True}
    assert view.history == [] and view.tallies == {}


def test_build_tick_defaults_to_the_current_epoch_and_refuses_future_ones():
    now = at_epoch(42).replace(minute=30)
    assert build_tick(None, now, EPOCH_SECONDS) == EpochTick(epoch=42, created_at=now)
    assert build_tick(40, now, EPOCH_SECONDS).epoch == 40
    with pytest.raises(typer.BadParameter, match="has not begun"):
        build_tick(43, now, EPOCH_SECONDS)


def test_tick_command_publishes_one_tick(monkeypatch):
    from typer.testing import CliRunner

    import loraledger.commands.governance as commands
    from loraledger.cli import app

    published = []
    monkeypatch.setattr(commands, "publish_sync",
                        lambda settings, events: published.extend(events) or len(events))
    monkeypatch.setenv("LORALEDGER_EPOCH_SECONDS", "60")
    runner = CliRunner()
    result = runner.invoke(app, ["governance", "tick"])
    assert result.exit_code == 0, result.output
    (tick,) = published
    assert isinstance(tick, EpochTick)
    assert tick.epoch == epoch_of(tick.created_at, 60)
    assert f"tick for epoch {tick.epoch}" in result.output
    future = runner.invoke(app, ["governance", "tick", "--epoch", str(tick.epoch + 10)])
    assert future.exit_code != 0 and "has not begun" in future.output
    assert len(published) == 1
