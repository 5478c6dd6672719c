"""Bad input on a consumed topic becomes a dead letter and the partition keeps moving: the
builder and the batch sorting on their own, then against the real broker."""

from __future__ import annotations

import asyncio
import base64

import pytest
from aiokafka import ConsumerRecord

from infra.kafka.clients import make_consumer, make_producer
from infra.kafka.dead_letters import dead_letter, validated
from infra.kafka.events import read_topic, send
from infra.settings import load_settings
from schemas.codec import decode, encode
from schemas.events import MAX_PROMPT_CHARS, DeadLetter, InferenceRequest
from schemas.topics import topic_name

BAD_VALUES = {
    "not json": b"\x00\x01 this is not json",
    "wrong schema": b'{"hello": "world"}',
    "oversized prompt": (
        '{"adapter_id": "a1", "prompt": "' + "x" * (MAX_PROMPT_CHARS + 1) + '"}'
    ).encode(),
    "traversal id": b'{"adapter_id": "../../etc/passwd", "prompt": "hi"}',
}


def _record(offset: int, value: bytes | None) -> ConsumerRecord:
    return ConsumerRecord(
        topic="p.requests", partition=2, offset=offset, timestamp=0, timestamp_type=0,
        key=b"a", value=value, checksum=None, serialized_key_size=1,
        serialized_value_size=len(value or b""), headers=(),
    )


def test_a_dead_letter_goes_to_dead_letters_keyed_by_its_source_topic():
    letter = dead_letter(
        None, source_topic="p.results", partition=1, offset=9, consumer="c", reason="empty"
    )
    assert (letter.topic, letter.key) == ("dead-letters", b"p.results")
    assert isinstance(letter.event, DeadLetter)
    assert (letter.event.partition, letter.event.offset, letter.event.raw_size) == (1, 9, 0)
    assert decode("dead-letters", encode(letter.event)) == letter.event


def test_validated_keeps_valid_events_in_order_and_dead_letters_the_rest():
    settings = load_settings({"LORALEDGER_TOPIC_PREFIX": "p."})
    good = InferenceRequest(adapter_id="legal-eu", prompt="What is the seed tax?")
    records = [
        _record(6, encode(good)),
        _record(7, b"\xffnot json"),
        _record(8, None),
        _record(9, encode(good)),
    ]
    batch = validated(records, settings, "worker-w")
    assert [(record.offset, event) for record, event in batch.events] == [(6, good), (9, good)]
    first, second = batch.dead_letters
    assert (first.topic, first.key) == ("dead-letters", b"p.requests")
    assert (first.event.partition, first.event.offset, first.event.source_topic) == (
        2, 7, "p.requests"
    )
    assert first.event.consumer == "worker-w"
    assert "UTF-8" in first.event.reason
    assert base64.b64decode(first.event.raw_b64) == b"\xffnot json"
    assert second.event.offset == 8 and second.event.reason == "empty message value"


async def _scenario(settings):
    good = InferenceRequest(adapter_id="legal-eu", prompt="What is the seed tax?")
    producer = make_producer(settings)
    await producer.start()
    requests_topic = topic_name("requests", settings.topic_prefix)
    try:
        # Same key, so everything lands on one partition, bad values before the good one.
        for value in BAD_VALUES.values():
            await producer.send_and_wait(requests_topic, value, key=b"legal-eu")
        await producer.send_and_wait(requests_topic, encode(good), key=b"legal-eu")
    finally:
        await producer.stop()

    consumer = make_consumer(settings, ["requests"], group_id="validator")
    producer = make_producer(settings)
    await consumer.start()
    await producer.start()
    received = []
    try:
        for _ in range(30):
            batch = await consumer.getmany(timeout_ms=1000)
            for records in batch.values():
                checked = validated(records, settings, "validator")
                received.extend(checked.events)
                for letter in checked.dead_letters:
                    await send(producer, settings, letter)
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


@pytest.mark.integration
def test_invalid_requests_are_dead_lettered_and_consumption_moves_on(kafka_settings):
    good, received, letters, committed = asyncio.run(_scenario(kafka_settings))

    assert [event for _, event in received] == [good]
    assert len(letters) == len(BAD_VALUES)
    reasons = [letter.reason for letter in letters]
    assert "not UTF-8" in reasons[0] or "not JSON" in reasons[0]
    assert "hello: Extra inputs are not permitted" in reasons[1]
    assert "prompt" in reasons[2] and "8192" in reasons[2]
    assert "invalid id" in reasons[3]
    for letter, (name, value) in zip(letters, BAD_VALUES.items(), strict=True):
        assert letter.source_topic == topic_name("requests", kafka_settings.topic_prefix), name
        assert letter.consumer == "validator"
        kept = base64.b64decode(letter.raw_b64)
        assert value.startswith(kept) and letter.raw_size == len(value)
    assert [letter.offset for letter in letters] == [0, 1, 2, 3]
    # The consumer committed past every message, bad ones included.
    assert sum(offset or 0 for offset in committed.values()) == len(BAD_VALUES) + 1
