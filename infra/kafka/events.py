"""Events on Kafka: what to send (`Outgoing`), sending and publishing events, and reading
records back as events. Values are encoded and decoded here, at the boundary, through the
topic registry; everything above handles pydantic events."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaProducer, ConsumerRecord
from pydantic import BaseModel

from infra.kafka.clients import make_consumer, make_producer
from infra.settings import Settings
from schemas.codec import DecodeError, decode, encode
from schemas.topics import topic_for_event, topic_name


@dataclass(frozen=True)
class Outgoing:
    """One event to send: encoded only when it is sent, to the logical topic's broker name
    under the stack's prefix."""

    topic: str  # logical topic name
    key: bytes
    event: BaseModel

    @classmethod
    def of(cls, event: BaseModel) -> Outgoing:
        """The event on its registry topic, keyed by the registry's key field."""
        spec = topic_for_event(event)
        return cls(spec.name, spec.key_of(event), event)


async def send(
    producer: AIOKafkaProducer, settings: Settings, message: Outgoing
) -> asyncio.Future:
    """Queue one message; returns the future of its delivery."""
    return await producer.send(
        topic_name(message.topic, settings.topic_prefix), encode(message.event), key=message.key
    )


async def send_event(
    producer: AIOKafkaProducer, settings: Settings, event: BaseModel
) -> asyncio.Future:
    """Send one event to its topic, keyed by the registry's key field; returns the future of
    its delivery."""
    return await send(producer, settings, Outgoing.of(event))


async def publish(settings: Settings, events: Iterable[BaseModel]) -> int:
    """Publish events and wait until the broker has them all; returns how many were sent.
    Raises if the broker refused any (an ACL, for one)."""
    producer = make_producer(settings)
    await producer.start()
    try:
        deliveries = [await send_event(producer, settings, event) for event in events]
        await producer.flush()
        await asyncio.gather(*deliveries)
    finally:
        await producer.stop()
    return len(deliveries)


def publish_sync(settings: Settings, events: Iterable[BaseModel]) -> int:
    return asyncio.run(publish(settings, list(events)))


@dataclass
class Decoded:
    """A consumed record and its event; `event` is None when the value did not decode, and
    `error` says why."""

    record: ConsumerRecord
    event: Any | None
    error: str | None = None


def decode_record(topic: str, record: ConsumerRecord) -> Decoded:
    """Decode a record of logical topic `topic`."""
    try:
        return Decoded(record, decode(topic, record.value))
    except DecodeError as exc:
        return Decoded(record, None, exc.reason)


def logical_topic(settings: Settings, broker_topic: str) -> str:
    prefix = settings.topic_prefix
    if prefix and broker_topic.startswith(prefix):
        return broker_topic[len(prefix):]
    return broker_topic


async def read_topic(
    settings: Settings, topic: str, *, limit: int | None = None, idle_timeout_s: float = 2.0
) -> AsyncIterator[Decoded]:
    """Read a topic from the beginning without a consumer group (committed data only),
    stopping after `limit` records or when nothing arrives for `idle_timeout_s`."""
    consumer = make_consumer(settings, [topic], group_id=None)
    await consumer.start()
    seen = 0
    try:
        while limit is None or seen < limit:
            batch = await consumer.getmany(timeout_ms=int(idle_timeout_s * 1000))
            if not batch:
                return
            for records in batch.values():
                for record in records:
                    yield decode_record(topic, record)
                    seen += 1
                    if limit is not None and seen >= limit:
                        return
    finally:
        await consumer.stop()
