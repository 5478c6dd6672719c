"""Outputs and offsets in one transaction, against the real broker: a committed call makes
both visible; a producer fenced by a newer one with its transactional id makes neither
visible."""

from __future__ import annotations

import asyncio
import gc

import pytest
from aiokafka import TopicPartition
from aiokafka.errors import KafkaError

from infra.kafka.clients import make_admin, make_producer
from infra.kafka.events import Outgoing, read_topic
from infra.kafka.transactions import send_and_commit
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
