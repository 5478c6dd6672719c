"""Fee and split maths: exact sums, deterministic ties."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.largest_remainder import largest_remainder
from pipeline.rewards import (
    TREASURY_ID,
    epoch_of,
    fee_for,
    role_shares,
    split_fee,
)
from schemas.events import (
    AttributionRecord,
    ContributorWeight,
    FeeSplit,
    InferenceResult,
    MethodInfo,
    Parameters,
    RewardRole,
    Usage,
    reward_entry_id,
)

HASH = "0" * 64
WHEN = datetime(2026, 1, 1, 12, 30, tzinfo=UTC)


def make_result(prompt: int = 10, completion: int = 5, adapter: str = "ad-1") -> InferenceResult:
    return InferenceResult(
        request_id="req-1",
        adapter_id=adapter,
        status="ok",
        usage=Usage(prompt_tokens=prompt, completion_tokens=completion),
        worker_id="gpu-0",
        created_at=WHEN,
    )


def make_attribution(weights: dict[str, int] | None) -> AttributionRecord:
    if weights is None:
        return AttributionRecord(
            request_id="req-1",
            adapter_id="ad-1",
            status="failed",
            failure_reason="no index",
            method=MethodInfo(name="trak", version="1"),
            evidence_hash=HASH,
        )
    return AttributionRecord(
        request_id="req-1",
        adapter_id="ad-1",
        status="ok",
        method=MethodInfo(name="trak", version="1"),
        contributor_weights=[
            ContributorWeight(contributor_id=c, datanet_id="dn", ppm=p) for c, p in weights.items()
        ],
        evidence_hash=HASH,
    )


def test_fee_is_tokens_times_adapter_price_else_default():
    parameters = Parameters(default_price_per_token=7, adapter_prices={"ad-2": 100})
    assert fee_for(make_result(10, 5, "ad-1"), parameters) == 15 * 7
    assert fee_for(make_result(10, 5, "ad-2"), parameters) == 15 * 100


def test_error_results_cost_nothing():
    failed = make_result().model_copy(update={"status": "error", "error_code": "internal_error"})
    assert fee_for(failed, Parameters()) == 0


def test_role_shares_follow_basis_points():
    parameters = Parameters(
        fee_split=FeeSplit(
            contributors=5000, adapter_owner=2500, compute_operator=1500, treasury=1000
        )
    )
    shares = role_shares(1000, parameters)
    assert shares == {
        RewardRole.CONTRIBUTOR: 500,
        RewardRole.ADAPTER_OWNER: 250,
        RewardRole.COMPUTE_OPERATOR: 150,
        RewardRole.TREASURY: 100,
    }


def test_split_pays_every_role_and_sums_to_fee():
    parameters = Parameters(default_price_per_token=7)
    entries = split_fee(
        make_result(),
        make_attribution({"alice": 600_000, "bob": 400_000}),
        parameters,
        parameters_version=3,
        adapter_owner="olga",
        epoch=42,
    )
    fee = 15 * 7
    assert sum(e.amount for e in entries) == fee
    by_key = {(e.beneficiary_id, e.role): e for e in entries}
    assert set(by_key) == {
        ("alice", RewardRole.CONTRIBUTOR),
        ("bob", RewardRole.CONTRIBUTOR),
        ("olga", RewardRole.ADAPTER_OWNER),
        ("gpu-0", RewardRole.COMPUTE_OPERATOR),
        (TREASURY_ID, RewardRole.TREASURY),
    }
    # contributors get 5000 bps of 105 = 52.5 -> 52 or 53; alice 60% of that.
    contributors = [e.amount for e in entries if e.role == RewardRole.CONTRIBUTOR]
    assert sum(contributors) in (52, 53)
    assert (
        by_key[("alice", RewardRole.CONTRIBUTOR)].amount
        > by_key[("bob", RewardRole.CONTRIBUTOR)].amount
    )
    for entry in entries:
        assert entry.fee_total == fee
        assert entry.parameters_version == 3
        assert entry.epoch == 42
        assert entry.created_at == WHEN
        assert entry.entry_id == reward_entry_id(
            "req-1", entry.beneficiary_id, entry.role.value, entry.datanet_id
        )
        assert (entry.datanet_id == "dn") == (entry.role == RewardRole.CONTRIBUTOR)
    assert "600000 ppm" in by_key[("alice", RewardRole.CONTRIBUTOR)].reason


def test_a_contributor_in_two_datanets_is_paid_once_per_datanet():
    attribution = AttributionRecord(
        request_id="req-1",
        adapter_id="ad-1",
        status="ok",
        method=MethodInfo(name="trak", version="1"),
        contributor_weights=[
            ContributorWeight(contributor_id="alice", datanet_id="dn-b", ppm=250_000),
            ContributorWeight(contributor_id="alice", datanet_id="dn-a", ppm=500_000),
            ContributorWeight(contributor_id="bob", datanet_id="dn-a", ppm=250_000),
        ],
        evidence_hash=HASH,
    )
    entries = split_fee(
        make_result(100, 0), attribution, Parameters(default_price_per_token=1),
        parameters_version=0, adapter_owner="olga", epoch=3,
    )
    paid = {(e.beneficiary_id, e.datanet_id): e.amount
            for e in entries if e.role == RewardRole.CONTRIBUTOR}
    # 5000 bps of 100 = 50, split 50% / 25% / 25%: 25, 12.5, 12.5; the leftover unit breaks the
    # tie by (contributor, datanet) order, so ("alice", "dn-b") gets it before ("bob", "dn-a").
    assert paid == {("alice", "dn-a"): 25, ("alice", "dn-b"): 13, ("bob", "dn-a"): 12}
    assert sum(e.amount for e in entries) == 100
    assert len({e.entry_id for e in entries}) == len(entries)
    alice_b = next(e for e in entries if e.datanet_id == "dn-b")
    assert alice_b.entry_id == reward_entry_id("req-1", "alice", "contributor", "dn-b")
    assert "250000 ppm in dn-b" in alice_b.reason
    assert all(e.datanet_id is None for e in entries if e.role != RewardRole.CONTRIBUTOR)


def test_failed_attribution_and_missing_owner_pay_the_treasury():
    parameters = Parameters(default_price_per_token=10)
    entries = split_fee(
        make_result(),
        make_attribution(None),
        parameters,
        parameters_version=0,
        adapter_owner=None,
        epoch=1,
    )
    fee = 150
    assert sum(e.amount for e in entries) == fee
    roles = {e.role for e in entries}
    assert RewardRole.CONTRIBUTOR not in roles
    assert RewardRole.ADAPTER_OWNER not in roles
    treasury = next(e for e in entries if e.beneficiary_id == TREASURY_ID)
    compute = next(e for e in entries if e.role == RewardRole.COMPUTE_OPERATOR)
    assert compute.amount in (22, 23)  # 1500 bps of 150 = 22.5
    assert treasury.amount == fee - compute.amount
    assert "no index" in treasury.reason


def test_split_is_deterministic_and_skips_zero_entries():
    parameters = Parameters(default_price_per_token=1)
    weights = {f"c{i}": 100_000 for i in range(10)}
    first = split_fee(
        make_result(1, 0),
        make_attribution(weights),
        parameters,
        parameters_version=0,
        adapter_owner="o",
        epoch=0,
    )
    second = split_fee(
        make_result(1, 0),
        make_attribution(weights),
        parameters,
        parameters_version=0,
        adapter_owner="o",
        epoch=0,
    )
    assert first == second
    assert all(e.amount > 0 for e in first)
    assert sum(e.amount for e in first) == 1


@settings(max_examples=100, deadline=None)
@given(
    tokens=st.integers(min_value=0, max_value=100_000),
    price=st.integers(min_value=0, max_value=10_000),
    raw_weights=st.lists(st.integers(min_value=1, max_value=1000), min_size=1, max_size=12),
    bps=st.lists(st.integers(min_value=0, max_value=10_000), min_size=3, max_size=3),
)
def test_entries_of_a_request_always_sum_to_its_fee(tokens, price, raw_weights, bps):
    first, second, third = sorted(bps)
    split = FeeSplit(
        contributors=first,
        adapter_owner=second - first,
        compute_operator=third - second,
        treasury=10_000 - third,
    )
    ppm = largest_remainder(1_000_000, dict(enumerate(raw_weights)))
    weights = {f"c{i}": p for i, p in ppm.items() if p}
    parameters = Parameters(fee_split=split, default_price_per_token=price)
    entries = split_fee(
        make_result(tokens, 0),
        make_attribution(weights),
        parameters,
        parameters_version=0,
        adapter_owner="owner",
        epoch=0,
    )
    assert sum(e.amount for e in entries) == tokens * price
    assert len({e.entry_id for e in entries}) == len(entries)


def test_epoch_numbers():
    assert epoch_of(WHEN, 3600) == int(WHEN.timestamp()) // 3600
    assert epoch_of(WHEN, 60) == int(WHEN.timestamp()) // 60
    with pytest.raises(ValueError, match="positive"):
        epoch_of(WHEN, 0)
