"""Reading topics without a consumer group: every partition assigned to this process, so any
number of gateways read the same records side by side."""

from __future__ import annotations

from aiokafka import AIOKafkaConsumer, TopicPartition

from infra.kafka.clients import make_consumer
from infra.settings import Settings
from schemas.topics import topic_spec


def partitions_of(settings: Settings, topics: list[str]) -> list[TopicPartition]:
    return [
        TopicPartition(topic_spec(name).broker_name(settings.topic_prefix), partition)
        for name in topics
        for partition in range(topic_spec(name).partitions)
    ]


async def start_tail(settings: Settings, topics: list[str], *,
                     from_beginning: bool) -> AIOKafkaConsumer:
    """A started read-committed consumer of every partition of `topics`, positioned at their
    beginning or at their end (as of now: later records are the ones it reads)."""
    consumer = make_consumer(settings, [], group_id=None, from_beginning=from_beginning)
    await consumer.start()
    try:
        partitions = partitions_of(settings, topics)
        consumer.assign(partitions)
        if from_beginning:
            await consumer.seek_to_beginning(*partitions)
        else:
            await consumer.seek_to_end(*partitions)
        for tp in partitions:  # resolve the positions now, not at the first fetch
            await consumer.position(tp)
    except BaseException:
        await consumer.stop()
        raise
    return consumer
