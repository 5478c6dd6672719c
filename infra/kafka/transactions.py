"""Exactly once on Kafka: the outputs of some consumed records and the offsets after them go
out in one transaction, so either both are visible to read-committed consumers or neither is,
and a crash between the two cannot happen."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from infra.kafka.clients import make_consumer
from infra.kafka.events import Outgoing, send
from infra.settings import Settings

TAIL_WINDOW = 256  # offsets read back from a partition's end first; widened 16-fold each time
FETCH_TIMEOUT_MS = 1000


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


async def after_last_committed(
    settings: Settings, ends: Mapping[TopicPartition, int]
) -> dict[TopicPartition, int]:
    """For each partition, the offset after its last committed record below `ends[tp]` (0 when
    it has none).

    A read-committed end offset is not that: the offsets below it also hold transaction
    markers, and records of aborted transactions (a producer killed mid-transaction leaves
    them, aborted when its successor starts). A reader that waits until it has seen the record
    at `end - 1` waits for ever when that offset is a marker or an aborted record."""
    found: dict[TopicPartition, int] = {tp: 0 for tp, end in ends.items() if end <= 0}
    pending = {tp: end for tp, end in ends.items() if end > 0}
    if not pending:
        # Nothing to read; and aiokafka 0.14 fails to stop a group-less consumer that never
        # waited once after its start (its coordinator task, cancelled unstarted, raises).
        return found
    consumer = make_consumer(settings, (), None)
    await consumer.start()
    try:
        consumer.assign(list(pending))
        window = TAIL_WINDOW
        while pending:
            starts = {tp: max(0, end - window) for tp, end in pending.items()}
            for tp, start in starts.items():
                consumer.seek(tp, start)
            last = await _last_offsets_below(consumer, pending)
            for tp in list(pending):
                if tp in last:
                    found[tp] = last[tp] + 1
                elif starts[tp] == 0:
                    found[tp] = 0
                else:
                    continue
                del pending[tp]
            window *= 16
        return found
    finally:
        await consumer.stop()


async def _last_offsets_below(
    consumer: AIOKafkaConsumer, ends: Mapping[TopicPartition, int]
) -> dict[TopicPartition, int]:
    """Read each partition from its position until its position reaches `ends[tp]`; the offset
    of the last record below the end, per partition that has one."""
    last: dict[TopicPartition, int] = {}
    remaining = set(ends)
    while remaining:
        batches = await consumer.getmany(*remaining, timeout_ms=FETCH_TIMEOUT_MS)
        for tp, records in batches.items():
            below = [record.offset for record in records if record.offset < ends[tp]]
            if below:
                last[tp] = max(below[-1], last.get(tp, -1))
        for tp in list(remaining):
            if await consumer.position(tp) >= ends[tp]:
                remaining.discard(tp)
    return last
