"""What a consumer in a group does when its view of the group may be stale: go back to the
committed offsets, or ask the group again which partitions are its own."""

from __future__ import annotations

from collections.abc import Iterable

from aiokafka import AIOKafkaConsumer, TopicPartition


async def rewind_to_committed(
    consumer: AIOKafkaConsumer, partitions: Iterable[TopicPartition]
) -> None:
    """Seek every partition still assigned to `consumer` to its group's committed offset (its
    beginning when nothing is committed), so what was read past it is read again. A partition
    revoked meanwhile is left alone: its new owner starts from the committed offset anyway."""
    for tp in partitions:
        if tp not in consumer.assignment():
            continue
        committed = await consumer.committed(tp)
        if committed is None:
            await consumer.seek_to_beginning(tp)
        else:
            consumer.seek(tp, committed)


def request_rejoin(consumer: AIOKafkaConsumer) -> None:
    """Make `consumer` rejoin its group at its next poll, as the Java client's
    `enforceRebalance()` does (aiokafka 0.14 has no public call for it): the rejoin revokes
    every partition and assigns again whatever the group says is this member's.

    A transactional producer can be fenced while its partition is still ours: the broker aborts
    a transaction left open past its timeout (a slow broker, replicas out of sync) by bumping
    the producer's epoch, which reads like a fence. Waiting for a rebalance then waits for
    ever, since none comes; the rejoin settles it either way."""
    coordinator = consumer._coordinator
    if coordinator is not None:
        coordinator.request_rejoin()
