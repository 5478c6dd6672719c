"""Bad input on a consumed topic goes to `dead-letters` and the partition keeps moving
(real broker)."""

from __future__ import annotations

import asyncio
import base64

import pytest
from aiokafka import AIOKafkaProducer

from infra.kafka.clients import (
    DeadLetterRouter,
    make_consumer,
    make_producer,
    read_topic,
    validated,
)
from infra.kafka.security import kafka_client_options
from schemas.events import MAX_PROMPT_CHARS, InferenceRequest
from schemas.topics import topic_name

pytestmark = pytest.mark.integration

BAD_VALUES = {
    "not json": b"\x00\x01 this is not json",
    "wrong schema": b'{"hello": "world"}',
    "oversized prompt": (
        '{"adapter_id": "a1", "prompt": "' + "x" * (MAX_PROMPT_CHARS + 1) + '"}'
    ).encode(),
    "traversal id": b'{"adapter_id": "../../etc/passwd", "prompt": "hi"}',
}


async def _scenario(settings):
    good = InferenceRequest(adapter_id="legal-eu", prompt="What is the seed tax?")
    raw = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap,
                           **kafka_client_options(settings))
    await raw.start()
    requests_topic = topic_name("requests", settings.topic_prefix)
    try:
        # Same key, so everything lands on one partition, bad values before the good one.
        for value in BAD_VALUES.values():
            await raw.send_and_wait(requests_topic, value, key=b"legal-eu")
        await raw.send_and_wait(requests_topic, good.model_dump_json().encode(), key=b"legal-eu")
    finally:
        await raw.stop()

    consumer = make_consumer(settings, ["requests"], group_id="validator")
    producer = make_producer(settings)
    await consumer.start()
    await producer.start()
    router = DeadLetterRouter(settings, producer, consumer_name="validator")
    received = []
    try:
        for _ in range(30):
            batch = await consumer.getmany(timeout_ms=1000)
            for records in batch.values():
                received.extend(await validated(records, settings, router))
            await producer.flush()
            await consumer.commit()
            if received:
                break
        committed = {
            tp: await consumer.committed(tp) for tp in consumer.assignment()
        }
    finally:
        await consumer.stop()
        await producer.stop()
    letters = [item.event async for item in read_topic(settings, "dead-letters", limit=10)]
    return good, received, letters, committed


def test_invalid_requests_are_dead_lettered_and_consumption_moves_on(kafka_settings):
    good, received, letters, committed = asyncio.run(_scenario(kafka_settings))

    assert [event for _, event in received] == [good]
    assert len(letters) == len(BAD_VALUES)
    reasons = [letter.reason for letter in letters]
    assert "not UTF-8" in reasons[0] or "not JSON" in reasons[0]
    assert "adapter_id" in reasons[1] and "prompt" in reasons[1]
    assert "prompt" in reasons[2] and "8192" in reasons[2]
    assert "invalid id" in reasons[3]
    for letter, (name, value) in zip(letters, BAD_VALUES.items(), strict=True):
        assert letter.source_topic == topic_name("requests", kafka_settings.topic_prefix), name
        kept = base64.b64decode(letter.raw_b64)
        assert value.startswith(kept) and letter.raw_size == len(value)
    assert [letter.offset for letter in letters] == [0, 1, 2, 3]
    # The consumer committed past every message, bad ones included.
    assert sum(offset or 0 for offset in committed.values()) == len(BAD_VALUES) + 1
