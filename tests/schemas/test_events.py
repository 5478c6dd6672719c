"""Event models: round trips for any valid value, refusals with a one-line reason."""

from __future__ import annotations

import json
import string
from datetime import UTC, datetime, timedelta, timezone

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from schemas import (
    AttributionRecord,
    DatanetContribution,
    DeadLetter,
    DecodeError,
    InferenceRequest,
    InferenceResult,
    RewardEntry,
    decode,
    encode,
)
from schemas.events import (
    MAX_CHAT_CHARS,
    MAX_CHAT_MESSAGES,
    MAX_DEAD_LETTER_BYTES,
    MAX_PROMPT_CHARS,
    ContributorWeight,
    FeeSplit,
    MethodInfo,
    ParameterChanges,
    Parameters,
    ParametersActivated,
    Proposal,
    ProposalTallied,
    Sketch,
    Vote,
    reward_entry_id,
)
from schemas.ids import is_valid_id
from schemas.text import normalize_text, row_id_for
from schemas.topics import topic_for_event

ids = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,40}\Z")
prompts = st.text(min_size=1, max_size=300).filter(lambda text: text != "")


@settings(max_examples=150, deadline=None)
@given(
    adapter=ids,
    prompt=prompts,
    max_new_tokens=st.integers(1, 2048),
    temperature=st.floats(0.0, 2.0),
    top_p=st.floats(0.01, 1.0),
    seed=st.integers(0, 2**63 - 1),
)
def test_request_round_trips(adapter, prompt, max_new_tokens, temperature, top_p, seed):
    request = InferenceRequest(
        adapter_id=adapter, prompt=prompt, max_new_tokens=max_new_tokens,
        temperature=temperature, top_p=top_p, seed=seed,
    )
    assert decode("requests", encode(request)) == request


@settings(max_examples=100, deadline=None)
@given(values=st.lists(st.floats(-1e6, 1e6, width=32), min_size=1, max_size=64))
def test_result_sketch_round_trips_bit_for_bit(values):
    sketch = Sketch.from_array(np.array(values, dtype=np.float32), seed=7, projection="gaussian")
    result = InferenceResult(
        request_id="r1", adapter_id="a1", status="ok", worker_id="w1", sketch=sketch,
        output_token_ids=[1, 2, 3],
    )
    decoded = decode("results", encode(result))
    assert decoded == result
    assert decoded.sketch.to_array().tobytes() == np.array(values, dtype=np.float32).tobytes()


@settings(max_examples=100, deadline=None)
@given(weights=st.lists(st.integers(0, 1_000_000), min_size=1, max_size=10))
def test_attribution_weights_must_sum_to_one_million(weights):
    record = dict(
        request_id="r1", adapter_id="a1", status="ok", evidence_hash="0" * 64,
        method=MethodInfo(name="trak", version="1"),
        contributor_weights=[
            ContributorWeight(contributor_id=f"c{i}", datanet_id="d", ppm=ppm)
            for i, ppm in enumerate(weights)
        ],
    )
    if sum(weights) == 1_000_000:
        assert decode("attributions", encode(AttributionRecord(**record))).status == "ok"
    else:
        with pytest.raises(ValidationError, match="sum to"):
            AttributionRecord(**record)


@pytest.mark.parametrize(
    "bad_id", ["../../etc/passwd", "..", ".hidden", "a/b", "a\\b", "", "x" * 129, "abc\n", "é"]
)
def test_ids_that_could_escape_a_directory_are_refused(bad_id):
    assert not is_valid_id(bad_id)
    with pytest.raises(ValidationError, match="invalid id"):
        InferenceRequest(adapter_id=bad_id, prompt="hello")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("prompt", ""),
        ("prompt", "x" * (MAX_PROMPT_CHARS + 1)),
        ("max_new_tokens", 0),
        ("max_new_tokens", 100_000),
        ("temperature", -0.1),
        ("temperature", 2.5),
        ("temperature", float("nan")),
        ("top_p", 0.0),
        ("seed", -1),
        ("unknown_field", 1),
    ],
)
def test_request_bounds_are_enforced(field, value):
    with pytest.raises(ValidationError):
        InferenceRequest(**{"adapter_id": "a", "prompt": "p", field: value})


def test_timestamps_are_normalised_to_utc():
    plus_two = timezone(timedelta(hours=2))
    request = InferenceRequest(
        adapter_id="a", prompt="p", created_at=datetime(2026, 1, 1, 12, tzinfo=plus_two)
    )
    assert request.created_at == datetime(2026, 1, 1, 10, tzinfo=UTC)
    assert request.created_at.utcoffset() == timedelta(0)
    with pytest.raises(ValidationError):
        InferenceRequest(adapter_id="a", prompt="p", created_at=datetime(2026, 1, 1))


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"\xff\xfe", "not UTF-8"),
        (b"not json", "not JSON"),
        (b"[1, 2]", "expected an object"),
        (b'{"adapter_id": "a"}', "prompt"),
        (b'{"adapter_id": "a", "prompt": "p", "extra": 1}', "extra"),
        (None, "empty"),
    ],
)
def test_decode_failures_carry_a_one_line_reason(raw, reason):
    with pytest.raises(DecodeError) as info:
        decode("requests", raw)
    assert reason in info.value.reason
    assert "\n" not in info.value.reason


def test_result_status_and_error_code_agree():
    with pytest.raises(ValidationError, match="error_code"):
        InferenceResult(request_id="r", adapter_id="a", status="error", worker_id="w")
    with pytest.raises(ValidationError, match="no error_code"):
        InferenceResult(
            request_id="r", adapter_id="a", status="ok", worker_id="w",
            error_code="unknown_adapter",
        )


def test_sketch_refuses_wrong_length_and_non_finite_values():
    good = Sketch.from_array(np.ones(4, dtype=np.float32), seed=1, projection="g")
    with pytest.raises(ValidationError, match="expected k=5"):
        Sketch(k=5, seed=1, projection="g", values_b64=good.values_b64)
    with pytest.raises(ValidationError, match="non-finite"):
        Sketch.from_array(np.array([1.0, np.nan], dtype=np.float32), seed=1, projection="g")


@settings(max_examples=100, deadline=None)
@given(request_id=ids, beneficiary=ids, amount=st.integers(0, 10**9), extra=st.integers(0, 10**9))
def test_reward_entry_ids_are_derived_and_amounts_bounded(request_id, beneficiary, amount, extra):
    entry_id = reward_entry_id(request_id, beneficiary, "contributor")
    entry = RewardEntry(
        entry_id=entry_id, request_id=request_id, adapter_id="a", epoch=3,
        beneficiary_id=beneficiary, role="contributor", amount=amount,
        fee_total=amount + extra, parameters_version=0,
    )
    assert decode("rewards", encode(entry)) == entry
    with pytest.raises(ValidationError, match="derived"):
        RewardEntry(**{**entry.model_dump(), "entry_id": "f" * 32})
    with pytest.raises(ValidationError):
        RewardEntry(**{**entry.model_dump(), "amount": -1})
    if extra > 0:
        with pytest.raises(ValidationError, match="exceed"):
            RewardEntry(**{**entry.model_dump(), "amount": amount + extra + 1})


@settings(max_examples=100, deadline=None)
@given(text=st.text(alphabet=string.printable + "éß \u00a0", min_size=1, max_size=200))
def test_contribution_row_id_is_the_hash_of_normalised_text(text):
    if not normalize_text(text):
        with pytest.raises(ValidationError):
            DatanetContribution(datanet_id="d", contributor_id="c", text=text)
        return
    contribution = DatanetContribution(datanet_id="d", contributor_id="c", text=text)
    assert contribution.row_id == row_id_for(text) == row_id_for("  " + text + "\n")
    assert decode("contributions", encode(contribution)) == contribution


def test_contribution_with_a_forged_row_id_is_refused():
    with pytest.raises(ValidationError, match="row_id"):
        DatanetContribution(datanet_id="d", contributor_id="c", text="hello", row_id="a" * 64)


def test_fee_split_must_sum_to_ten_thousand_bps():
    with pytest.raises(ValidationError, match="10000"):
        FeeSplit(contributors=5000, adapter_owner=2500, compute_operator=1500, treasury=999)


def test_parameter_changes_apply_on_top_of_current_values():
    current = Parameters(adapter_prices={"a": 5})
    changed = ParameterChanges(top_k=4, adapter_prices={"b": 7}).apply(current)
    assert changed.top_k == 4
    assert changed.adapter_prices == {"a": 5, "b": 7}
    assert changed.fee_split == current.fee_split
    with pytest.raises(ValidationError, match="at least one"):
        ParameterChanges()


def test_governance_topic_decodes_each_kind():
    proposal = Proposal(proposer_id="p", epoch=2, changes=ParameterChanges(top_k=8))
    vote = Vote(proposal_id=proposal.proposal_id, voter_id="v", support=True)
    assert decode("governance", encode(proposal)) == proposal
    assert decode("governance", encode(vote)) == vote
    with pytest.raises(DecodeError):
        decode("governance", b'{"kind": "coup", "proposal_id": "x"}')


def test_tallies_and_activations_decode_only_from_the_decisions_topic():
    """Only the governance principal may write `governance-decisions`; one written to
    `governance` (which clients may write) is not a decision at all."""
    tally = ProposalTallied(proposal_id="p1", epoch=1, yes_weight=5, no_weight=0, passed=True)
    activation = ParametersActivated(version=1, effective_epoch=2, parameters=Parameters(),
                                     proposal_id="p1")
    for decision in (tally, activation):
        assert topic_for_event(decision).name == "governance-decisions"
        assert decode("governance-decisions", encode(decision)) == decision
        with pytest.raises(DecodeError):
            decode("governance", encode(decision))
    proposal = Proposal(proposer_id="p", epoch=2, changes=ParameterChanges(top_k=8))
    with pytest.raises(DecodeError):
        decode("governance-decisions", encode(proposal))


def test_dead_letter_truncates_large_payloads():
    raw = b"x" * (MAX_DEAD_LETTER_BYTES + 10)
    letter = DeadLetter.for_bytes(
        raw, source_topic="requests", partition=0, offset=5, consumer="c", reason="bad"
    )
    assert letter.truncated and letter.raw_size == len(raw)
    assert decode("dead-letters", encode(letter)) == letter


def test_contributor_entries_name_their_datanet_and_old_entries_still_decode():
    old_id = reward_entry_id("r1", "alice", "contributor")
    # An entry encoded before datanet_id existed: no such key in the JSON.
    old_json = (
        '{"schema_version": 1, "created_at": "2026-01-01T00:00:00Z", "entry_id": "'
        + old_id + '", "request_id": "r1", "adapter_id": "a", "epoch": 3, '
        '"beneficiary_id": "alice", "role": "contributor", "amount": 5, "fee_total": 10, '
        '"parameters_version": 0, "reason": ""}'
    ).encode()
    old = decode("rewards", old_json)
    assert old.datanet_id is None and old.entry_id == old_id
    new = RewardEntry(
        entry_id=reward_entry_id("r1", "alice", "contributor", "dn-1"), request_id="r1",
        adapter_id="a", epoch=3, beneficiary_id="alice", role="contributor", amount=5,
        fee_total=10, parameters_version=0, datanet_id="dn-1",
    )
    assert new.entry_id != old_id
    assert decode("rewards", encode(new)) == new
    with pytest.raises(ValidationError, match="derived"):
        RewardEntry(**{**new.model_dump(), "entry_id": old_id})
    with pytest.raises(ValidationError, match="derived"):
        RewardEntry(**{**new.model_dump(), "datanet_id": "dn-2"})
    with pytest.raises(ValidationError, match="carries no datanet_id"):
        RewardEntry(**{**new.model_dump(), "role": "treasury", "beneficiary_id": "treasury",
                       "entry_id": reward_entry_id("r1", "treasury", "treasury", "dn-1")})
    with pytest.raises(ValidationError, match="invalid id"):
        RewardEntry(**{**new.model_dump(), "datanet_id": "../x"})


def test_epoch_tick_is_a_governance_event():
    from schemas.events import EpochTick
    from schemas.topics import topic_for_event

    tick = EpochTick(epoch=7)
    assert decode("governance", encode(tick)) == tick
    assert topic_for_event(tick).name == "governance"
    with pytest.raises(DecodeError, match="epoch"):
        decode("governance", b'{"kind": "tick", "epoch": -1}')
    with pytest.raises(DecodeError):
        decode("governance", b'{"kind": "tick", "epoch": 1, "proposal_id": "x"}')


def test_a_request_carries_a_prompt_or_a_conversation_never_both():
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    request = InferenceRequest(adapter_id="a", messages=chat)
    assert request.prompt is None and request.prompt_input == request.messages
    assert decode("requests", encode(request)) == request
    for fields in ({}, {"prompt": "p", "messages": chat}):
        with pytest.raises(ValidationError, match="exactly one of prompt and messages"):
            InferenceRequest(adapter_id="a", **fields)


@pytest.mark.parametrize(
    "messages",
    [
        [],
        [{"role": "tool", "content": "x"}],
        [{"role": "user", "content": "x", "name": "n"}],
        [{"role": "user", "content": "x" * (MAX_PROMPT_CHARS + 1)}],
        [{"role": "user", "content": "x"}] * (MAX_CHAT_MESSAGES + 1),
        [{"role": "user", "content": "x" * MAX_PROMPT_CHARS}]
        * (MAX_CHAT_CHARS // MAX_PROMPT_CHARS + 1),
    ],
)
def test_conversation_bounds_are_enforced(messages):
    with pytest.raises(ValidationError):
        InferenceRequest(adapter_id="a", messages=messages)


def test_events_of_the_current_version_written_before_conversations_still_decode():
    raw = (
        b'{"schema_version": 1, "created_at": "2026-01-01T00:00:00Z", "request_id": "r1",'
        b' "adapter_id": "a", "prompt": "p", "max_new_tokens": 4, "temperature": 0.0,'
        b' "top_p": 1.0, "seed": 0, "stop": [], "client_id": null}'
    )
    request = decode("requests", raw)
    assert request.prompt_input == "p" and request.messages is None
    result = decode(
        "results",
        b'{"request_id": "r1", "adapter_id": "a", "status": "ok", "prompt": "p",'
        b' "worker_id": "w"}',
    )
    assert result.messages is None and result.prompt_text == "p"


# What the previous schema's producers wrote (and its consumers, which refuse unknown fields and
# a null prompt, read): a request and a result of the same content must encode to these bytes.
_AT = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
_PREVIOUS_REQUEST = (
    b'{"schema_version":1,"created_at":"2026-11-01T12:00:00Z","request_id":"r1",'
    b'"adapter_id":"a1","prompt":"Hello","max_new_tokens":64,"temperature":0.0,"top_p":1.0,'
    b'"seed":0,"stop":[],"client_id":"c1","stream":false}'
)
_PREVIOUS_RESULT = (
    b'{"schema_version":1,"created_at":"2026-11-01T12:00:00Z","request_id":"r1",'
    b'"adapter_id":"a1","status":"ok","error_code":null,"error_message":null,"prompt":"Hello",'
    b'"output_text":" world","prompt_token_ids":[1,2],"output_token_ids":[3],'
    b'"finish_reason":null,"usage":{"prompt_tokens":0,"completion_tokens":0},"timings":null,'
    b'"cache_tier":"none","adapter_hash":null,"base_model_hash":null,"worker_id":"w1",'
    b'"sketch":null,"signature":null}'
)


def test_prompt_events_encode_exactly_as_before_conversations_and_the_base_model():
    request = InferenceRequest(
        request_id="r1", adapter_id="a1", prompt="Hello", client_id="c1", created_at=_AT
    )
    result = InferenceResult(
        request_id="r1", adapter_id="a1", status="ok", prompt="Hello", output_text=" world",
        prompt_token_ids=[1, 2], output_token_ids=[3], worker_id="w1", created_at=_AT,
    )
    assert encode(request) == _PREVIOUS_REQUEST
    assert encode(result) == _PREVIOUS_RESULT
    assert decode("requests", _PREVIOUS_REQUEST) == request
    assert decode("results", _PREVIOUS_RESULT) == result


def test_a_signature_covers_the_bytes_that_travel():
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from schemas.signatures import public_key_b64, sign_event, signature_problem

    key = Ed25519PrivateKey.generate()
    result = sign_event(
        InferenceResult(request_id="r1", status="ok", prompt="p", worker_id="w1"), key
    )
    payload = json.loads(encode(result))
    assert "adapter_id" not in payload and "messages" not in payload
    assert signature_problem(payload, public_key_b64(key)) is None


@pytest.mark.parametrize(
    "event",
    [
        InferenceRequest(adapter_id="a1", messages=[{"role": "user", "content": "Hi"}]),
        InferenceRequest(prompt="Hello", stream=True),
        InferenceResult(request_id="r1", status="ok", worker_id="w1",
                        messages=[{"role": "system", "content": ""},
                                  {"role": "user", "content": "Hi"}]),
    ],
    ids=["chat", "base-model prompt", "base-model chat result"],
)
def test_new_events_round_trip_and_leave_out_what_they_lack(event):
    raw = encode(event)
    topic = "requests" if isinstance(event, InferenceRequest) else "results"
    assert decode(topic, raw) == event
    payload = json.loads(raw)
    absent = {name for name in ("adapter_id", "prompt", "messages") if getattr(event, name) is None}
    assert absent and not absent & payload.keys()
