from __future__ import annotations

import json

import pytest

from schemas import InferenceRequest
from schemas.events import Vote
from schemas.export import EXPORTED, export_json_schemas
from schemas.topics import TOPICS, topic_for_event, topic_name


def test_every_topic_of_the_architecture_is_registered():
    assert set(TOPICS) == {
        "requests", "results", "token-deltas", "attributions", "rewards", "datanets",
        "contributions", "adapters", "governance", "governance-decisions", "workers",
        "dead-letters",
    }


def test_prefix_applies_to_every_name():
    assert topic_name("requests", "stack1.") == "stack1.requests"
    with pytest.raises(ValueError, match="unknown topic"):
        topic_name("nope")


def test_events_find_their_topic_and_key():
    request = InferenceRequest(adapter_id="legal-eu", prompt="p")
    spec = topic_for_event(request)
    assert spec.name == "requests"
    assert spec.key_of(request) == b"legal-eu"
    assert topic_for_event(Vote(proposal_id="p1", voter_id="v", support=False)).name == "governance"


def test_compacted_and_retained_topics_have_configs():
    assert TOPICS["adapters"].topic_config() == {"cleanup.policy": "compact"}
    assert TOPICS["requests"].topic_config()["retention.ms"] == "-1"


def test_topics_whose_time_is_read_take_the_brokers_clock():
    for name in ("results", "governance"):
        assert TOPICS[name].topic_config()["message.timestamp.type"] == "LogAppendTime"
    assert "message.timestamp.type" not in TOPICS["requests"].topic_config()


def test_answers_to_one_request_share_a_key_and_worker_keys_are_kept_per_key():
    from schemas.events import InferenceResult, WorkerRegistered

    result = InferenceResult(request_id="r1", adapter_id="a1", status="error",
                             error_code="internal_error", worker_id="w1")
    assert TOPICS["results"].key_of(result) == b"r1"
    registration = WorkerRegistered(worker_id="w1", public_key="A" * 43 + "=")
    assert TOPICS["workers"].key_of(registration) == b"w1/" + b"A" * 43 + b"="


def test_export_writes_a_schema_per_event(tmp_path):
    written = export_json_schemas(tmp_path)
    assert len(written) == len(EXPORTED)
    schema = json.loads((tmp_path / "InferenceRequest.schema.json").read_text())
    assert schema["additionalProperties"] is False
    # No adapter asks the base model alone; exactly one of prompt and messages is checked after.
    assert "required" not in schema
    assert {"prompt", "messages"} <= schema["properties"].keys()


def test_base_model_requests_spread_by_request_id():
    spec = TOPICS["requests"]
    assert spec.key_of(InferenceRequest(request_id="r1", adapter_id="a1", prompt="p")) == b"a1"
    assert spec.key_of(InferenceRequest(request_id="r1", prompt="p")) == b"r1"


def test_events_without_a_key_value_get_an_empty_key():
    from schemas.events import EpochTick

    tick = EpochTick(epoch=5)
    assert topic_for_event(tick).name == "governance"
    assert topic_for_event(tick).key_of(tick) == b""
