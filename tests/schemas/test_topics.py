from __future__ import annotations

import json

import pytest

from schemas import InferenceRequest
from schemas.events import Vote
from schemas.export import EXPORTED, export_json_schemas
from schemas.topics import TOPICS, topic_for_event, topic_name


def test_every_topic_of_the_architecture_is_registered():
    assert set(TOPICS) == {
        "requests", "results", "attributions", "rewards", "contributions", "adapters",
        "governance", "governance-decisions", "dead-letters",
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


def test_export_writes_a_schema_per_event(tmp_path):
    written = export_json_schemas(tmp_path)
    assert len(written) == len(EXPORTED)
    schema = json.loads((tmp_path / "InferenceRequest.schema.json").read_text())
    assert schema["additionalProperties"] is False
    assert "prompt" in schema["required"]


def test_events_without_a_key_value_get_an_empty_key():
    from schemas.events import EpochTick

    tick = EpochTick(epoch=5)
    assert topic_for_event(tick).name == "governance"
    assert topic_for_event(tick).key_of(tick) == b""
