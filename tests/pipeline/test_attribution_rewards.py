"""Rewards computed by the attribution processor: one result's attribution record and reward
entries come out of one call (so the agent sends them in one transaction), priced with the
parameters in force at the result's epoch and paying the owner the adapter's manifest names."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from attribution_support import make_adapter, make_result

from inference.adapter_store import AdapterDir
from pipeline.attribution.artifacts import ArtifactCache
from pipeline.attribution.parameters import DEFAULTS
from pipeline.attribution.processing import process_result
from pipeline.governance import GENESIS
from pipeline.rewards import TREASURY_ID
from schemas.codec import encode
from schemas.events import (
    FeeSplit,
    InferenceResult,
    Parameters,
    ParametersActivated,
    RewardRole,
    Usage,
)
from schemas.topics import topic_spec

EPOCH_SECONDS = 100
WHEN = datetime.fromtimestamp(7 * EPOCH_SECONDS + 5, UTC)  # epoch 7
PRICED = Parameters(
    default_price_per_token=3,
    adapter_prices={"adapter-a": 7},
    fee_split=FeeSplit(contributors=5000, adapter_owner=2000, compute_operator=2000,
                       treasury=1000),
)


@pytest.fixture
def adapter(tmp_path):
    return make_adapter(tmp_path, owner_id="olga")


@pytest.fixture
def cache(tmp_path):
    return ArtifactCache(tmp_path)


def priced(epochs: list[int]):
    """Pricing that records which epochs it was asked about: version 3 with `PRICED`."""

    def pricing(epoch: int) -> ParametersActivated:
        epochs.append(epoch)
        return ParametersActivated(version=3, effective_epoch=epoch, parameters=PRICED,
                                   created_at=WHEN)

    return pricing


def with_usage(result: InferenceResult, prompt: int = 20, completion: int = 13):
    return result.model_copy(update={
        "usage": Usage(prompt_tokens=prompt, completion_tokens=completion), "created_at": WHEN,
    })


def run(raw: bytes, cache: ArtifactCache, pricing=DEFAULTS.parameters_for_epoch) -> list:
    return process_result(raw, source_topic="t.results", partition=1, offset=9,
                          parameters=Parameters(), cache=cache, pricing=pricing,
                          epoch_seconds=EPOCH_SECONDS)


def decoded(out: list, topic: str) -> list:
    return [o.event for o in out if o.topic == topic]


def test_an_ok_result_gives_its_record_and_entries_summing_to_the_fee(adapter, cache):
    epochs: list[int] = []
    out = run(encode(with_usage(make_result(adapter))), cache, priced(epochs))
    assert [o.topic for o in out][0] == "attributions"
    assert {o.topic for o in out[1:]} == {"rewards"}
    (record,) = decoded(out, "attributions")
    entries = decoded(out, "rewards")
    assert record.status == "ok"
    assert epochs == [7]
    assert sum(e.amount for e in entries) == 33 * 7  # the adapter's own price
    assert {(e.epoch, e.parameters_version, e.fee_total) for e in entries} == {(7, 3, 231)}
    by_role: dict[RewardRole, int] = {}
    for entry in entries:
        by_role[entry.role] = by_role.get(entry.role, 0) + entry.amount
    assert by_role[RewardRole.CONTRIBUTOR] == 231 * 5000 // 10_000 + 1  # 115.5, largest rem.
    paid = {(e.beneficiary_id, e.datanet_id) for e in entries if e.role == RewardRole.CONTRIBUTOR}
    assert paid and paid <= {(w.contributor_id, w.datanet_id) for w in record.contributor_weights}
    owner = [e for e in entries if e.role == RewardRole.ADAPTER_OWNER]
    assert [(e.beneficiary_id, e.amount) for e in owner] == [("olga", 46)]
    assert [e.beneficiary_id for e in entries if e.role == RewardRole.COMPUTE_OPERATOR] == [
        "worker-test"]
    spec = topic_spec("rewards")
    assert all(o.key == spec.key_of(e)
               for o, e in zip(out[1:], entries, strict=True))


def test_a_failed_attribution_pays_the_contributors_share_to_the_treasury(adapter, cache):
    result = with_usage(make_result(adapter)).model_copy(update={"sketch": None})
    out = run(encode(result), cache, priced([]))
    (record,) = decoded(out, "attributions")
    entries = decoded(out, "rewards")
    assert record.status == "failed"
    assert sum(e.amount for e in entries) == 231
    assert {e.role for e in entries} == {RewardRole.ADAPTER_OWNER, RewardRole.COMPUTE_OPERATOR,
                                        RewardRole.TREASURY}
    treasury = [e for e in entries if e.beneficiary_id == TREASURY_ID]
    assert "unattributed: no_sketch" in treasury[0].reason
    assert [e.beneficiary_id for e in entries if e.role == RewardRole.ADAPTER_OWNER] == ["olga"]


def test_an_unknown_adapter_pays_owner_and_contributors_shares_to_the_treasury(adapter, cache):
    result = with_usage(make_result(adapter, adapter_id="nobody"))
    entries = decoded(run(encode(result), cache), "rewards")
    # Priced without governance: version 0, the defaults.
    defaults = Parameters()
    assert sum(e.amount for e in entries) == 33 * defaults.default_price_per_token
    assert {e.parameters_version for e in entries} == {0}
    assert {e.beneficiary_id for e in entries} == {TREASURY_ID, "worker-test"}
    assert "adapter has no owner" in next(
        e.reason for e in entries if e.beneficiary_id == TREASURY_ID)


def test_an_error_result_pays_nothing(adapter, cache):
    result = with_usage(make_result(adapter, status="error"))
    assert run(encode(result), cache, priced([])) == []


def test_a_corrupt_sketch_is_dead_lettered_attributed_as_failed_and_paid(adapter, cache):
    payload = json.loads(encode(with_usage(make_result(adapter))))
    payload["sketch"]["values_b64"] = payload["sketch"]["values_b64"][:-8]
    out = run(json.dumps(payload).encode(), cache, priced([]))
    assert [o.topic for o in out[:2]] == ["dead-letters", "attributions"]
    entries = decoded(out, "rewards")
    assert sum(e.amount for e in entries) == 231
    assert all(e.request_id == "req-1" for e in entries)


def test_a_zero_fee_gives_the_record_and_no_entries(adapter, cache):
    result = with_usage(make_result(adapter), prompt=0, completion=0)
    assert [o.topic for o in run(encode(result), cache, priced([]))] == ["attributions"]


def test_processing_again_gives_identical_entries(adapter, tmp_path):
    """Entries carry the result's timestamp, not the processing time: a redone transaction
    sends the same events."""
    raw = encode(with_usage(make_result(adapter)))
    first = run(raw, ArtifactCache(tmp_path), priced([]))
    again = run(raw, ArtifactCache(tmp_path), priced([]))
    assert [o for o in first if o.topic == "rewards"] == [o for o in again if o.topic == "rewards"]
    assert len(first) > 2


def test_owner_comes_from_a_valid_manifest_owner_only(adapter, cache, tmp_path):
    assert cache.owner_of("adapter-a") == "olga"
    assert cache.owner_of("nobody") is None
    assert cache.owner_of("../escape") is None
    manifest_path = AdapterDir(adapter["dir"]).manifest_path
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps({**manifest, "owner_id": "../root"}))
    assert ArtifactCache(tmp_path).owner_of("adapter-a") is None


def test_pricing_without_governance_is_version_zero_defaults():
    assert DEFAULTS.parameters_for_epoch(12) == GENESIS
    assert DEFAULTS.current_parameters() == Parameters()
