"""Rewards computed by the attribution processor: one result's attribution record and reward
entries come out of one call (so the agent sends them in one transaction), priced with the
parameters in force at the result's epoch and paying the owner the adapter's manifest names."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from attribution_support import WORKER, facts_for, make_adapter, make_result, signed_bytes
from signing import Identity

from inference.adapter_store import AdapterDir
from pipeline.attribution.artifacts import ArtifactCache
from pipeline.attribution.attributor import attribute
from pipeline.attribution.facts import Facts
from pipeline.attribution.parameters import DEFAULTS
from pipeline.attribution.processing import Origin, process_result
from pipeline.governance import GENESIS, active_parameters
from pipeline.rewards import TREASURY_ID
from schemas.events import (
    FeeSplit,
    InferenceResult,
    Parameters,
    ParametersActivated,
    RewardRole,
    Usage,
)
from schemas.signatures import sign_payload
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
    """`result` with `prompt` and `completion` token ids, and the usage that counts them."""
    return result.model_copy(update={
        "prompt_token_ids": list(range(prompt)), "output_token_ids": list(range(completion)),
        "finish_reason": "length",
        "usage": Usage(prompt_tokens=prompt, completion_tokens=completion),
    })


def run(
    result: InferenceResult,
    cache: ArtifactCache,
    pricing=DEFAULTS.parameters_for_epoch,
    *,
    raw: bytes | None = None,
    facts: Facts | None = None,
) -> list:
    """Process `result` (signed by the registered worker, or sent as `raw`), appended by the
    broker at WHEN, against `facts` (default: its request and the worker are known)."""
    return process_result(
        signed_bytes(result) if raw is None else raw,
        origin=Origin("t.results", 1, 9, WHEN),
        facts=facts_for(result) if facts is None else facts,
        cache=cache, pricing=pricing, epoch_seconds=EPOCH_SECONDS,
    )


def decoded(out: list, topic: str) -> list:
    return [o.event for o in out if o.topic == topic]


def test_an_ok_result_gives_its_record_and_entries_summing_to_the_fee(adapter, cache):
    epochs: list[int] = []
    out = run(with_usage(make_result(adapter)), cache, priced(epochs))
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
    out = run(result, cache, priced([]))
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
    entries = decoded(run(result, cache), "rewards")
    # Priced without governance: version 0, the defaults.
    defaults = Parameters()
    assert sum(e.amount for e in entries) == 33 * defaults.default_price_per_token
    assert {e.parameters_version for e in entries} == {0}
    assert {e.beneficiary_id for e in entries} == {TREASURY_ID, "worker-test"}
    assert "adapter has no owner" in next(
        e.reason for e in entries if e.beneficiary_id == TREASURY_ID)


def test_a_base_model_result_pays_the_operator_and_the_rest_to_the_treasury(adapter, cache):
    result = with_usage(make_result(adapter)).model_copy(
        update={"adapter_id": None, "adapter_hash": None, "sketch": None}
    )
    out = run(result, cache, priced([]))
    (record,) = decoded(out, "attributions")
    entries = decoded(out, "rewards")
    assert record.adapter_id is None and record.status == "failed"
    assert record.failure_reason.startswith("base_model: ")
    fee = 33 * PRICED.default_price_per_token  # no adapter, so no adapter's price
    assert sum(e.amount for e in entries) == fee
    assert {(e.role, e.beneficiary_id) for e in entries} == {
        (RewardRole.COMPUTE_OPERATOR, "worker-test"), (RewardRole.TREASURY, TREASURY_ID)}
    operator = next(e for e in entries if e.role == RewardRole.COMPUTE_OPERATOR)
    assert operator.amount == 20  # 2000 bps of 99 = 19.8, rounded up by largest remainder
    assert all(e.adapter_id is None for e in entries)
    assert "no adapter owner" in next(e.reason for e in entries if e.role == RewardRole.TREASURY)


def test_an_error_result_pays_nothing(adapter, cache):
    result = with_usage(make_result(adapter, status="error"))
    assert run(result, cache, priced([])) == []


def test_a_corrupt_sketch_is_dead_lettered_attributed_as_failed_and_paid(adapter, cache):
    result = with_usage(make_result(adapter))
    payload = json.loads(signed_bytes(result))
    payload["sketch"]["values_b64"] = payload["sketch"]["values_b64"][:-8]
    payload["signature"] = sign_payload(WORKER.key, payload)  # the worker sent it so
    out = run(result, cache, priced([]), raw=json.dumps(payload).encode())
    assert [o.topic for o in out[:2]] == ["dead-letters", "attributions"]
    entries = decoded(out, "rewards")
    assert sum(e.amount for e in entries) == 231
    assert all(e.request_id == "req-1" for e in entries)


def test_a_zero_fee_gives_the_record_and_no_entries(adapter, cache):
    result = with_usage(make_result(adapter), prompt=0, completion=0)
    assert [o.topic for o in run(result, cache, priced([]))] == ["attributions"]


def test_processing_again_gives_identical_entries(adapter, tmp_path):
    """Entries carry the time the broker appended the result, not the processing time: a
    redone transaction sends the same events."""
    result = with_usage(make_result(adapter))
    raw = signed_bytes(result)
    first = run(result, ArtifactCache(tmp_path), priced([]), raw=raw)
    again = run(result, ArtifactCache(tmp_path), priced([]), raw=raw)
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
    assert DEFAULTS.parameters_for_epoch(12).parameters == Parameters()


# --- what is not paid ---------------------------------------------------------------------


def refused(out: list) -> str:
    """The reason of the one dead letter `out` holds, which must be all it holds."""
    assert [o.topic for o in out] == ["dead-letters"], [o.topic for o in out]
    return out[0].event.reason


def test_forged_usage_is_not_paid(adapter, cache):
    forged = with_usage(make_result(adapter)).model_copy(
        update={"usage": Usage(prompt_tokens=4_000_000_000, completion_tokens=13)})
    assert "does not recount" in refused(run(forged, cache, priced([])))


def test_token_ids_beyond_what_the_request_allows_are_not_paid(adapter, cache):
    prompt_bytes = len(make_result(adapter).prompt.encode())
    padded = with_usage(make_result(adapter), prompt=prompt_bytes + 2)
    assert "prompt token ids for a prompt of" in refused(run(padded, cache, priced([])))
    rambling = with_usage(make_result(adapter), completion=65)
    assert "the request allows 64" in refused(run(rambling, cache, priced([])))


def test_the_stop_token_is_charged_though_not_carried(adapter, cache):
    stopped = with_usage(make_result(adapter)).model_copy(update={
        "finish_reason": "stop", "usage": Usage(prompt_tokens=20, completion_tokens=14)})
    assert sum(e.amount for e in decoded(run(stopped, cache), "rewards")) == 34 * 10
    two_more = stopped.model_copy(update={"usage": Usage(prompt_tokens=20, completion_tokens=15)})
    assert "does not recount" in refused(run(two_more, cache))


def test_a_result_without_a_request_is_not_paid(adapter, cache):
    result = with_usage(make_result(adapter))
    out = run(result, cache, facts=facts_for())
    assert "no request req-1 on `requests`" in refused(out)


def test_a_result_that_does_not_answer_its_request_is_not_paid(adapter, cache):
    result = with_usage(make_result(adapter))
    other_prompt = result.model_copy(update={"prompt": "Something else entirely, please"})
    assert "does not answer" in refused(run(other_prompt, cache, facts=facts_for(result)))


def test_only_a_registered_workers_signature_earns_the_operators_share(adapter, cache):
    result = with_usage(make_result(adapter))
    mallory = Identity.new("mallory")
    claims_mallory = result.model_copy(update={"worker_id": "mallory"})
    out = run(claims_mallory, cache, raw=signed_bytes(claims_mallory, mallory))
    assert "worker mallory is not authenticated: no key is registered" in refused(out)
    impersonates = run(result, cache, raw=signed_bytes(result, mallory))
    assert "does not verify" in refused(impersonates)
    unsigned = run(result, cache, raw=result.model_dump_json().encode())
    assert "not signed" in refused(unsigned)


def test_a_request_is_paid_once_whatever_the_adapter(adapter, cache, tmp_path):
    make_adapter(tmp_path, "adapter-b", seed=3)
    first = with_usage(make_result(adapter))
    second = with_usage(make_result(adapter, adapter_id="adapter-b"))
    facts = facts_for(first, second)
    assert decoded(run(first, cache, facts=facts), "rewards")
    assert "request req-1 is already paid" in refused(run(second, cache, facts=facts))
    # Once committed, the payment is known from `attributions`, after a restart too.
    facts.pending.clear()
    (record,) = decoded(run(first, cache, facts=facts_for(first)), "attributions")
    restarted = facts_for(first, second)
    restarted.learn(record)
    assert "already paid" in refused(run(second, cache, facts=restarted))


def test_a_result_of_an_old_epoch_is_attributed_with_that_epochs_mix(adapter, cache):
    """Processed after governance changed the mix (from epoch 8 on), a result the broker
    appended in epoch 7 gets epoch 7's mix, as a replay of the log would."""
    old = Parameters(gradient_weight_ppm=1_000_000, lexical_weight_ppm=0, top_k=4)
    new = Parameters(gradient_weight_ppm=0, lexical_weight_ppm=1_000_000)
    history = [
        ParametersActivated(version=1, effective_epoch=0, parameters=old, created_at=WHEN),
        ParametersActivated(version=2, effective_epoch=8, parameters=new, created_at=WHEN),
    ]
    result = with_usage(make_result(adapter))
    out = run(result, cache, lambda epoch: active_parameters(history, epoch))
    (record,) = decoded(out, "attributions")
    params = record.method.params
    assert (params["gradient_weight_ppm"], params["lexical_weight_ppm"], params["top_k"]) == (
        1_000_000, 0, 4,
    )
    assert record.contributor_weights == attribute(result, old, cache).contributor_weights
    assert record.contributor_weights != attribute(result, new, cache).contributor_weights
    assert {entry.parameters_version for entry in decoded(out, "rewards")} == {1}


def test_epoch_and_entry_time_are_the_brokers_not_the_results(adapter, cache):
    epochs: list[int] = []
    from_2100 = with_usage(make_result(adapter)).model_copy(
        update={"created_at": datetime(2100, 1, 1, tzinfo=UTC)})
    entries = decoded(run(from_2100, cache, priced(epochs)), "rewards")
    assert epochs == [7]
    assert {(e.epoch, e.created_at) for e in entries} == {(7, WHEN)}


def test_a_result_the_broker_did_not_stamp_is_not_paid(adapter, cache):
    result = with_usage(make_result(adapter))
    out = process_result(
        signed_bytes(result), origin=Origin("t.results", 1, 9, None), facts=facts_for(result),
        cache=cache, pricing=priced([]), epoch_seconds=EPOCH_SECONDS,
    )
    assert "LogAppendTime" in refused(out)
