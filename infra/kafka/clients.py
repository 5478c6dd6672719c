"""Kafka plumbing shared by every producer and consumer: topic creation from the registry,
producers that encode events, and consumers that validate at the boundary and send whatever
does not decode to the dead-letter topic, so a bad message never blocks a partition."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError
from pydantic import BaseModel

from infra.kafka.security import kafka_client_options
from infra.settings import Settings
from schemas.codec import DecodeError, decode, encode
from schemas.events import DeadLetter
from schemas.topics import TOPICS, topic_for_event, topic_name


async def ensure_topics(settings: Settings, names: Iterable[str] | None = None) -> list[str]:
    """Create the registry's topics under the settings' prefix; returns the ones created."""
    specs = [TOPICS[name] for name in (names or TOPICS)]
    admin = make_admin(settings)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        wanted = [
            NewTopic(
                spec.broker_name(settings.topic_prefix),
                num_partitions=spec.partitions,
                replication_factor=1,
                topic_configs=spec.topic_config(),
            )
            for spec in specs
            if spec.broker_name(settings.topic_prefix) not in existing
        ]
        if wanted:
            # Another process may create them between our listing and our request.
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics(wanted)
        return [topic.name for topic in wanted]
    finally:
        await admin.close()


def make_admin(settings: Settings, **options: Any) -> AIOKafkaAdminClient:
    return AIOKafkaAdminClient(
        bootstrap_servers=settings.kafka_bootstrap, **kafka_client_options(settings), **options
    )


def make_producer(settings: Settings, transactional_id: str | None = None) -> AIOKafkaProducer:
    return AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap,
        enable_idempotence=True,
        acks="all",
        transactional_id=transactional_id,
        max_request_size=4 * 1024 * 1024,
        **kafka_client_options(settings),
    )


async def send_event(
    producer: AIOKafkaProducer, settings: Settings, event: BaseModel
) -> asyncio.Future:
    """Send one event to its topic, keyed by the registry's key field; returns the future of
    its delivery."""
    spec = topic_for_event(event)
    return await producer.send(
        spec.broker_name(settings.topic_prefix), encode(event), key=spec.key_of(event)
    )


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


def dead_letter_for(record: ConsumerRecord, consumer: str, reason: str) -> DeadLetter:
    return DeadLetter.for_bytes(
        record.value or b"",
        source_topic=record.topic,
        partition=record.partition,
        offset=record.offset,
        consumer=consumer,
        reason=reason,
    )


@dataclass
class Decoded:
    """A consumed record and its event; `event` is None when it went to the dead letters."""

    record: ConsumerRecord
    event: Any | None
    error: str | None = None


def decode_record(topic: str, record: ConsumerRecord) -> Decoded:
    try:
        return Decoded(record, decode(topic, record.value))
    except DecodeError as exc:
        return Decoded(record, None, exc.reason)


def make_consumer(
    settings: Settings,
    topics: Iterable[str],
    group_id: str | None,
    *,
    from_beginning: bool = True,
    **options: Any,
) -> AIOKafkaConsumer:
    """A read-committed consumer of logical topics; offsets are committed by the caller,
    after the work (or inside a transaction)."""
    return AIOKafkaConsumer(
        *(topic_name(name, settings.topic_prefix) for name in topics),
        bootstrap_servers=settings.kafka_bootstrap,
        group_id=group_id,
        isolation_level="read_committed",
        enable_auto_commit=False,
        auto_offset_reset="earliest" if from_beginning else "latest",
        **kafka_client_options(settings),
        **options,
    )


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


class DeadLetterRouter:
    """Sends records that failed validation to `dead-letters`, with where they came from and
    why, so the consumer can move past them."""

    def __init__(self, settings: Settings, producer: AIOKafkaProducer, consumer_name: str) -> None:
        self._settings = settings
        self._producer = producer
        self._consumer_name = consumer_name
        self.routed = 0

    async def route(self, record: ConsumerRecord, reason: str) -> None:
        await send_event(
            self._producer, self._settings, dead_letter_for(record, self._consumer_name, reason)
        )
        self.routed += 1


async def validated(
    records: Iterable[ConsumerRecord], settings: Settings, router: DeadLetterRouter
) -> list[tuple[ConsumerRecord, Any]]:
    """Decode a batch of records; invalid ones go to the dead letters, valid ones are returned
    with their events, in order."""
    valid = []
    for record in records:
        decoded = decode_record(logical_topic(settings, record.topic), record)
        if decoded.event is None:
            await router.route(record, decoded.error or "invalid event")
        else:
            valid.append((record, decoded.event))
    return valid
