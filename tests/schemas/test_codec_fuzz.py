"""The codec is total: for every topic, any bytes decode to an event of that topic or raise
DecodeError with a one-line reason, never anything else (a consumer dead-letters the one and
serves the other). Arbitrary bytes, arbitrary JSON, and valid events with a field replaced by
something hostile; then each limit on its own, with its reason."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from schemas.codec import MAX_INT, MAX_NESTING, MAX_VALUE_BYTES, MIN_INT, DecodeError, decode
from schemas.events import (
    MAX_CONTRIBUTION_CHARS,
    MAX_PROMPT_CHARS,
    MAX_TOKENS,
    AdapterRegistered,
    AttributionRecord,
    ContributorWeight,
    DatanetContribution,
    DatanetCreated,
    DeadLetter,
    EpochTick,
    ExampleScore,
    FeeSplit,
    InferenceRequest,
    InferenceResult,
    MethodInfo,
    ParameterChanges,
    Parameters,
    ParametersActivated,
    Proposal,
    ProposalTallied,
    RewardEntry,
    Sketch,
    Timings,
    TokenDelta,
    Usage,
    Vote,
    VoterKeyRegistered,
    WorkerRegistered,
    reward_entry_id,
)
from schemas.topics import TOPICS, topic_for_event

HASH = "ab" * 32
FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])

SAMPLES: dict[str, list[BaseModel]] = {
    "requests": [
        InferenceRequest(adapter_id="a1", prompt="the price of salt is", stop=["."],
                         client_id="c1", seed=2**63 - 1),
    ],
    "results": [
        InferenceResult(
            request_id="r1", adapter_id="a1", status="ok", prompt="p", output_text="o",
            prompt_token_ids=[1, 2], output_token_ids=[3], finish_reason="stop",
            usage=Usage(prompt_tokens=2, completion_tokens=1),
            timings=Timings(queue_ms=1, adapter_load_ms=0, prefill_ms=2, decode_ms=3,
                            total_ms=6),
            adapter_hash=HASH, base_model_hash=HASH, worker_id="w1",
            sketch=Sketch.from_array(np.arange(4, dtype=np.float32), seed=1,
                                     projection="gaussian"),
            signature="C" * 86 + "==",
        ),
        InferenceResult(request_id="r2", adapter_id="a1", status="error", worker_id="w1",
                        error_code="unknown_adapter", error_message="no such adapter"),
    ],
    "token-deltas": [TokenDelta(request_id="r1", offset=0, text=" Paris")],
    "attributions": [
        AttributionRecord(
            request_id="r1", adapter_id="a1", status="ok", evidence_hash=HASH,
            method=MethodInfo(name="trak", version="1", params={"k": 4, "lambda": 0.5}),
            top_examples=[ExampleScore(example_index=0, row_id=HASH, contributor_id="c1",
                                       datanet_id="d1", score=0.25)],
            contributor_weights=[ContributorWeight(contributor_id="c1", datanet_id="d1",
                                                   ppm=1_000_000)],
        ),
    ],
    "rewards": [
        RewardEntry(
            entry_id=reward_entry_id("r1", "c1", "contributor", "d1"), request_id="r1",
            adapter_id="a1", epoch=3, beneficiary_id="c1", role="contributor", amount=50,
            fee_total=100, parameters_version=0, datanet_id="d1",
        ),
    ],
    "datanets": [DatanetCreated(datanet_id="d1", description="Water safety.")],
    "contributions": [
        DatanetContribution(datanet_id="d1", contributor_id="c1", text="Boil water first."),
    ],
    "adapters": [
        AdapterRegistered(
            adapter_id="a1", owner_id="o1", base_model_hash=HASH, weights_hash=HASH, rank=8,
            datanet_id="d1", snapshot_version=1, snapshot_hash=HASH,
            training_config={"lr": 0.001, "steps": 200, "targets": ["q", "v"]},
            contributors=["c1"],
        ),
    ],
    "governance": [
        Proposal(
            proposer_id="p1", epoch=4,
            changes=ParameterChanges(
                fee_split=FeeSplit(contributors=6000, adapter_owner=2000, compute_operator=1000,
                                   treasury=1000),
                adapter_prices={"a1": 12},
            ),
        ),
        Vote(proposal_id="p1", voter_id="v1", support=True, signature="B" * 86 + "=="),
        VoterKeyRegistered(voter_id="v1", public_key="A" * 43 + "="),
        EpochTick(epoch=5),
    ],
    "governance-decisions": [
        ProposalTallied(proposal_id="p1", epoch=4, yes_weight=10, no_weight=2, passed=True),
        ParametersActivated(version=1, effective_epoch=5, parameters=Parameters(),
                            proposal_id="p1"),
    ],
    "workers": [WorkerRegistered(worker_id="w1", public_key="A" * 43 + "=")],
    "dead-letters": [
        DeadLetter.for_bytes(b"[[[", source_topic="requests", partition=0, offset=1,
                             consumer="worker", reason="value is not JSON"),
    ],
}

# JSON text that no field of any event accepts, or that the parser must not be handed.
HOSTILE_FRAGMENTS = [
    "9" * 5000,  # past Python's 4,300-digit conversion limit
    "-" + "9" * 30,
    str(MAX_INT + 1),
    str(MIN_INT - 1),
    "1e999",
    "-1e999",
    '"' + "9" * 4000 + '"',  # validation converts strings to integers
    '"1e999"',
    '"NaN"',
    "NaN",
    "Infinity",
    "-Infinity",
    "[" * 100_000,
    "[" * 5000 + "]" * 5000,
    '{"a":' * 40 + "1" + "}" * 40,
    '"' + "x" * 200_000 + '"',
    '"\\ud800"',  # a lone surrogate
    '"\\u0000\\u202e\\u200b"',
    '{"a": 1, "a": 2}',
    "[1, [2, [3]]]",
    '"9999-12-31T23:59:59-23:59"',  # a timestamp past year 9999 in UTC
    '"0001-01-01T00:00:00+23:59"',
    "true",
    "null",
    "-0",
    "0.1e-400",
    '"' + "\\\\" * 1000 + '"',
]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=50),
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=30,
)
fragments = st.sampled_from(HOSTILE_FRAGMENTS) | json_values.map(json.dumps)
topics = st.sampled_from(sorted(TOPICS))


def assert_decodes_or_refuses(topic: str, data: bytes) -> None:
    """The property: an event of `topic`, or DecodeError with one specific line."""
    try:
        event = decode(topic, data)
    except DecodeError as exc:
        assert exc.reason and len(exc.reason) <= 1024, exc.reason
        assert exc.reason.isprintable(), exc.reason
        # The last line of defence turns an unforeseen exception into DecodeError; every case
        # here is a foreseen one, with its own reason.
        assert not exc.reason.startswith("undecodable"), exc.reason
        return
    assert topic_for_event(event).name == topic


def _field_paths(value: Any, path: tuple = ()) -> list[tuple]:
    """Every path to a value inside a JSON document (object keys and list indexes)."""
    paths = [path] if path else []
    if isinstance(value, dict):
        for key, child in value.items():
            paths += _field_paths(child, (*path, key))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            paths += _field_paths(child, (*path, index))
    return paths


_SLOT = "\x00fuzz-slot\x00"


def _with_fragment(document: dict, path: tuple, fragment: str) -> bytes:
    """`document` as JSON with the value at `path` replaced by the raw JSON text `fragment`
    (raw, because json.dumps cannot write most of the fragments)."""
    document = json.loads(json.dumps(document))
    holder = document
    for step in path[:-1]:
        holder = holder[step]
    holder[path[-1]] = _SLOT
    return json.dumps(document).replace(json.dumps(_SLOT), fragment, 1).encode("utf-8")


def test_every_topic_has_samples_that_decode():
    assert set(SAMPLES) == set(TOPICS)
    for topic, events in SAMPLES.items():
        for event in events:
            assert decode(topic, event.model_dump_json().encode()) == event


@FUZZ
@given(topic=topics, data=st.binary(max_size=2000))
def test_arbitrary_bytes(topic, data):
    assert_decodes_or_refuses(topic, data)


@FUZZ
@given(topic=topics, value=json_values)
def test_arbitrary_json(topic, value):
    assert_decodes_or_refuses(topic, json.dumps(value).encode())


@FUZZ
@given(topic=topics, data=st.data())
def test_valid_events_with_one_value_replaced(topic, data):
    event = data.draw(st.sampled_from(SAMPLES[topic]))
    document = event.model_dump(mode="json")
    path = data.draw(st.sampled_from(_field_paths(document)))
    fragment = data.draw(fragments)
    assert_decodes_or_refuses(topic, _with_fragment(document, path, fragment))


@FUZZ
@given(topic=topics, data=st.data())
def test_valid_events_with_a_field_removed_repeated_or_added(topic, data):
    event = data.draw(st.sampled_from(SAMPLES[topic]))
    text = event.model_dump_json()
    document = json.loads(text)
    field = data.draw(st.sampled_from(sorted(document)))
    mutation = data.draw(st.sampled_from(["remove", "repeat", "add"]))
    if mutation == "remove":
        del document[field]
        raw = json.dumps(document).encode()
    elif mutation == "repeat":
        raw = (text[:-1] + f", {json.dumps(field)}: {data.draw(fragments)}}}").encode()
    else:
        name = data.draw(st.text(max_size=20))
        raw = (text[:-1] + f", {json.dumps(name)}: {data.draw(fragments)}}}").encode()
    assert_decodes_or_refuses(topic, raw)


@FUZZ
@given(topic=topics, data=st.data())
def test_valid_events_cut_or_with_bytes_flipped(topic, data):
    raw = bytearray(data.draw(st.sampled_from(SAMPLES[topic])).model_dump_json().encode())
    cut = data.draw(st.integers(0, len(raw)))
    flips = data.draw(st.lists(st.tuples(st.integers(0, len(raw) - 1), st.integers(0, 255)),
                               max_size=4))
    for position, byte in flips:
        raw[position] = byte
    assert_decodes_or_refuses(topic, bytes(raw[:cut] if data.draw(st.booleans()) else raw))


# --- each limit, with its reason --------------------------------------------------------------

REQUEST = '{"adapter_id": "a1", "prompt": "hi"%s}'


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"[" * 100_000, f"nests 100000 levels deep, over the limit of {MAX_NESTING}"),
        (b'{"a":' * (MAX_NESTING + 1) + b"1" + b"}" * (MAX_NESTING + 1), "nests 17 levels"),
        (b" " * (MAX_VALUE_BYTES + 1), "over the limit of 4194304"),
        ((REQUEST % (', "seed": ' + "7" * 5000)).encode(), "integer of more than 4300 digits"),
        ((REQUEST % ', "temperature": NaN').encode(), "NaN is not a JSON number"),
        ((REQUEST % ', "temperature": -Infinity').encode(), "-Infinity is not a JSON number"),
        ((REQUEST % ', "temperature": 1e999').encode(), "temperature: Input should be a finite"),
        ((REQUEST % ', "prompt": "again"').encode(), "duplicate key 'prompt'"),
        (b'{"adapter_id": "a1", "prompt": "\xc3\x28"}', "not UTF-8 (byte 32)"),
        ((REQUEST % ', "created_at": "9999-12-31T23:59:59-23:59"').encode(), "out of range"),
        ((REQUEST % ', "seed": 1.5').encode(), "seed: Input should be a valid integer"),
    ],
)
def test_limits_refuse_with_a_specific_reason(raw, reason):
    with pytest.raises(DecodeError) as info:
        decode("requests", raw)
    assert reason in info.value.reason
    assert "\n" not in info.value.reason


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("usage", {"prompt_tokens": MAX_TOKENS + 1, "completion_tokens": 1},
         f"invalid results event: usage.prompt_tokens: Input should be less than or equal to "
         f"{MAX_TOKENS}"),
        ("prompt_token_ids", [1, 2, MAX_INT + 1],
         "prompt_token_ids: integer outside the 64-bit range"),
        ("timings", {"queue_ms": 1e308 * 10, "adapter_load_ms": 0, "prefill_ms": 0,
                     "decode_ms": 0, "total_ms": 0}, "timings.queue_ms: number is not finite"),
        ("prompt_token_ids", [1, "9" * 4000], "prompt_token_ids: integer outside the 64-bit range"),
        ("prompt_token_ids", [str(MAX_INT + 1)],
         "prompt_token_ids: integer outside the 64-bit range"),
        ("timings", {"queue_ms": "Infinity", "adapter_load_ms": 0, "prefill_ms": 0,
                     "decode_ms": 0, "total_ms": 0}, "timings.queue_ms: number is not finite"),
    ],
)
def test_numbers_are_bounded_also_when_converted_from_strings(field, value, reason):
    document = SAMPLES["results"][0].model_dump(mode="json") | {field: value}
    with pytest.raises(DecodeError) as info:
        decode("results", json.dumps(document).replace("Infinity", "1e999").encode())
    assert info.value.reason == reason


def test_brackets_inside_strings_are_not_nesting():
    prompt = "[{" * (MAX_PROMPT_CHARS // 2)
    request = InferenceRequest(adapter_id="a1", prompt=prompt)
    assert decode("requests", request.model_dump_json().encode()) == request


def test_the_largest_events_we_write_decode():
    result = InferenceResult(
        request_id="r1", adapter_id="a1", status="ok", worker_id="w1",
        prompt="p" * MAX_PROMPT_CHARS, output_text="o" * 16_384,
        prompt_token_ids=list(range(4096)), output_token_ids=list(range(2048)),
        sketch=Sketch.from_array(np.ones(65_536, dtype=np.float32), seed=2**40,
                                 projection="gaussian"),
    )
    contribution = DatanetContribution(datanet_id="d1", contributor_id="c1",
                                       text="é" * MAX_CONTRIBUTION_CHARS)
    assert decode("results", result.model_dump_json().encode()) == result
    assert decode("contributions", contribution.model_dump_json().encode()) == contribution


def test_an_unforeseen_exception_becomes_a_decode_error(monkeypatch):
    from schemas import codec

    def explode(data):
        raise KeyError("something nobody thought of")

    monkeypatch.setattr(codec, "parse_object", explode)
    with pytest.raises(DecodeError, match="undecodable requests value: KeyError"):
        decode("requests", b"{}")
