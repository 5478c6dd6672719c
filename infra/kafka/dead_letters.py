"""Dead letters: a consumed message that is not a valid event goes to `dead-letters`, with
where it came from and why, so its consumer moves past it instead of blocking the partition.
`dead_letter` is the one way to build one; `validated` sorts a batch into its events and the
dead letters of the rest, which the caller sends (inside its transaction, where it has one)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from aiokafka import ConsumerRecord

from infra.kafka.events import Outgoing, decode_record, logical_topic
from infra.settings import Settings
from schemas.events import DeadLetter


def dead_letter(
    raw: bytes | None,
    *,
    source_topic: str,
    partition: int,
    offset: int,
    consumer: str,
    reason: str,
) -> Outgoing:
    """The dead letter for the message at `offset` of the broker topic `source_topic`, which
    `consumer` could not use because of `reason`."""
    return Outgoing.of(
        DeadLetter.for_bytes(
            raw or b"",
            source_topic=source_topic,
            partition=partition,
            offset=offset,
            consumer=consumer,
            reason=reason,
        )
    )


@dataclass
class Validated:
    """A batch sorted at the boundary: the valid records with their events, in order, and the
    dead letters of the others."""

    events: list[tuple[ConsumerRecord, Any]] = field(default_factory=list)
    dead_letters: list[Outgoing] = field(default_factory=list)


def validated(records: Iterable[ConsumerRecord], settings: Settings, consumer: str) -> Validated:
    """Decode a batch of records consumed by `consumer`; each record that does not decode
    becomes a dead letter."""
    batch = Validated()
    for record in records:
        decoded = decode_record(logical_topic(settings, record.topic), record)
        if decoded.event is None:
            batch.dead_letters.append(
                dead_letter(
                    record.value,
                    source_topic=record.topic,
                    partition=record.partition,
                    offset=record.offset,
                    consumer=consumer,
                    reason=decoded.error or "invalid event",
                )
            )
        else:
            batch.events.append((record, decoded.event))
    return batch
