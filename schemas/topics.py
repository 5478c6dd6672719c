"""The topic registry: the single place topic facts live (name, key, partitions, retention)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import TypeAdapter

from schemas import events

HOUR_MS = 3600 * 1000
DAY_MS = 24 * HOUR_MS
# A consumed record's `timestamp_type` when the broker stamped it (Kafka's code for
# LogAppendTime); 0 is CreateTime, the producer's clock.
LOG_APPEND_TIME_TYPE = 1


@dataclass(frozen=True)
class TopicSpec:
    name: str  # logical name; the broker name is prefix + name
    key_field: str  # event field whose value is the message key
    partitions: int
    value: Any  # the event model (or annotated union) of the values
    compacted: bool = False
    retention_ms: int = -1  # -1: keep forever (the log is the source of truth)
    # The broker stamps each record with the time it appended it, so time read from the record
    # (epochs of fees and governance) is the broker's, never a producer's clock.
    log_append_time: bool = False

    def broker_name(self, prefix: str = "") -> str:
        return f"{prefix}{self.name}"

    def topic_config(self) -> dict[str, str]:
        if self.compacted:
            config = {"cleanup.policy": "compact"}
        else:
            config = {"cleanup.policy": "delete", "retention.ms": str(self.retention_ms)}
        if self.log_append_time:
            config["message.timestamp.type"] = "LogAppendTime"
        return config

    def key_of(self, event: Any) -> bytes:
        """The message key; empty for events without one (an epoch tick has no proposal)."""
        key = getattr(event, self.key_field)
        return b"" if key is None else str(key).encode("utf-8")


_SPECS = [
    TopicSpec("requests", "routing_key", 8, events.InferenceRequest),
    # Keyed by request id: every answer to one request lands on one partition, so one
    # attribution processor decides which of them (the first) is paid.
    TopicSpec("results", "request_id", 8, events.InferenceResult, log_append_time=True),
    # A side channel for streaming clients, worthless once its request has a result.
    TopicSpec("token-deltas", "request_id", 8, events.TokenDelta, retention_ms=HOUR_MS),
    TopicSpec("attributions", "request_id", 8, events.AttributionRecord),
    TopicSpec("rewards", "beneficiary_id", 8, events.RewardEntry),
    # Before `contributions` when a store is rebuilt: a contribution counts once its datanet
    # exists.
    TopicSpec("datanets", "datanet_id", 1, events.DatanetCreated),
    TopicSpec("contributions", "datanet_id", 4, events.DatanetContribution),
    TopicSpec("adapters", "adapter_id", 4, events.AdapterRegistered, compacted=True),
    # One partition each: proposals, votes and tallies must be read in the order they happened.
    TopicSpec("governance", "proposal_id", 1, events.GovernanceInput, log_append_time=True),
    TopicSpec("governance-decisions", "proposal_id", 1, events.GovernanceDecision),
    # One partition, so "the first key registered for a worker" is well defined.
    TopicSpec("workers", "registry_key", 1, events.WorkerRegistered, compacted=True),
    TopicSpec("dead-letters", "source_topic", 1, events.DeadLetter, retention_ms=30 * DAY_MS),
]

TOPICS: dict[str, TopicSpec] = {spec.name: spec for spec in _SPECS}

_ADAPTERS: dict[str, TypeAdapter] = {spec.name: TypeAdapter(spec.value) for spec in _SPECS}


def topic_spec(name: str) -> TopicSpec:
    try:
        return TOPICS[name]
    except KeyError:
        raise ValueError(f"unknown topic {name!r}: expected one of {', '.join(TOPICS)}") from None


def topic_name(name: str, prefix: str = "") -> str:
    """The broker's name for a logical topic under a stack's prefix."""
    return topic_spec(name).broker_name(prefix)


def value_adapter(name: str) -> TypeAdapter:
    topic_spec(name)
    return _ADAPTERS[name]


def topic_for_event(event: Any) -> TopicSpec:
    """The topic an event belongs on."""
    for spec in _SPECS:
        value = spec.value
        members = getattr(value, "__metadata__", None) and value.__origin__.__args__
        if (members and type(event) in members) or type(event) is value:
            return spec
    raise ValueError(f"no topic carries {type(event).__name__}")
