"""Outputs and offsets in one transaction, against the real broker: a committed call makes
both visible; a producer fenced by a newer one with its transactional id makes neither
visible. And where a partition's committed records end, past markers and aborted
transactions."""

from __future__ import annotations

import asyncio
import gc

import pytest
from aiokafka import TopicPartition
from aiokafka.errors import KafkaError

from infra.kafka.clients import make_admin, make_consumer, make_producer
from infra.kafka.events import Outgoing, read_topic
from infra.kafka.transactions import TAIL_WINDOW, after_last_committed, send_and_commit
from infra.settings import Settings
from schemas.events import ErrorCode, InferenceResult
from schemas.topics import topic_name

pytestmark = pytest.mark.integration


def _result(request_id: str) -> Outgoing:
    return Outgoing.of(
        InferenceResult(
            request_id=request_id, adapter_id="a", status="error", worker_id="w",
            error_code=ErrorCode.UNKNOWN_ADAPTER,
        )
    )


async def _committed(settings: Settings, group: str) -> dict[TopicPartition, int]:
    admin = make_admin(settings)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group)
    finally:
        await admin.close()
    return {tp: meta.offset for tp, meta in offsets.items()}


async def _scenario(settings: Settings) -> tuple[list, dict, dict]:
    source = TopicPartition(topic_name("requests", settings.topic_prefix), 0)
    group_a, group_b = f"{settings.topic_prefix}group-a", f"{settings.topic_prefix}group-b"
    committing = make_producer(settings, transactional_id=f"{settings.topic_prefix}txn")
    await committing.start()
    try:
        await send_and_commit(
            committing, settings, [_result("r1"), _result("r2")], {source: 2}, group_a
        )
    finally:
        await committing.stop()

    zombie = make_producer(settings, transactional_id=f"{settings.topic_prefix}fenced")
    await zombie.start()
    successor = make_producer(settings, transactional_id=f"{settings.topic_prefix}fenced")
    await successor.start()  # fences the zombie
    try:
        with pytest.raises(KafkaError):
            await send_and_commit(zombie, settings, [_result("r3")], {source: 1}, group_b)
    finally:
        await zombie.stop()
        await successor.stop()

    results = [item.event.request_id async for item in read_topic(settings, "results")]
    return results, await _committed(settings, group_a), await _committed(settings, group_b)


def test_outputs_and_offsets_commit_together_or_not_at_all(kafka_settings):
    results, committed, fenced = asyncio.run(_scenario(kafka_settings))
    # The zombie's message futures hold ProducerFenced and nobody awaits them: collect them now,
    # so asyncio reports them here rather than from a finalizer inside a later compile (which
    # CPython 3.11.7 turns into a SystemError).
    gc.collect()
    source = TopicPartition(topic_name("requests", kafka_settings.topic_prefix), 0)
    assert sorted(results) == ["r1", "r2"]
    assert committed == {source: 2}
    assert fenced.get(source, -1) == -1


async def _transaction(producer, tp: TopicPartition, count: int, commit: bool) -> None:
    await producer.begin_transaction()
    for n in range(count):
        await producer.send(tp.topic, f"record {n}".encode(), partition=tp.partition)
    if commit:
        await producer.commit_transaction()
    else:
        await producer.abort_transaction()


async def _tails(settings: Settings) -> tuple[dict, dict, dict]:
    topic = topic_name("results", settings.topic_prefix)
    tps = [TopicPartition(topic, partition) for partition in range(4)]
    producer = make_producer(settings, transactional_id=f"{settings.topic_prefix}tails")
    await producer.start()
    try:
        await _transaction(producer, tps[0], 3, commit=True)  # offsets 0-2, marker 3
        await _transaction(producer, tps[0], 2, commit=False)  # 4-5, marker 6
        await _transaction(producer, tps[2], 5, commit=False)
        # More aborted offsets than the first window reads back from the end.
        await _transaction(producer, tps[3], 7, commit=True)  # 0-6, marker 7
        await _transaction(producer, tps[3], TAIL_WINDOW + 40, commit=False)
    finally:
        await producer.stop()
    consumer = make_consumer(settings, (), None)
    await consumer.start()
    try:
        ends = await consumer.end_offsets(tps)
    finally:
        await consumer.stop()
    expected = {tps[0]: 3, tps[1]: 0, tps[2]: 0, tps[3]: 7}
    assert await after_last_committed(settings, {tps[1]: 0}) == {tps[1]: 0}
    return ends, await after_last_committed(settings, ends), expected


def test_the_offset_after_the_last_committed_record_skips_markers_and_aborted_records(
    kafka_settings,
):
    ends, after, expected = asyncio.run(_tails(kafka_settings))
    assert after == expected
    # The read-committed end offsets lie past markers and aborted records.
    assert all(ends[tp] > offset for tp, offset in expected.items() if tp.partition != 1)
