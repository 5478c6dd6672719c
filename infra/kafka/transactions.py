"""Exactly once on Kafka: the outputs of some consumed records and the offsets after them go
out in one transaction, so either both are visible to read-committed consumers or neither is,
and a crash between the two cannot happen."""

from __future__ import annotations

from collections.abc import Iterable

from aiokafka import AIOKafkaProducer, TopicPartition

from infra.kafka.events import Outgoing, send
from infra.settings import Settings


async def send_and_commit(
    producer: AIOKafkaProducer,
    settings: Settings,
    messages: Iterable[Outgoing],
    offsets: dict[TopicPartition, int],
    group_id: str,
) -> None:
    """Send `messages` and commit `offsets` (the next offset to consume, per input partition)
    for consumer group `group_id`, in one transaction of the transactional `producer`. Raises
    what the producer raises; the transaction is then aborted."""
    async with producer.transaction():
        for message in messages:
            await send(producer, settings, message)
        await producer.send_offsets_to_transaction(offsets, group_id)
