"""Follow whole topics as lookup state: read every partition from the beginning (committed
data only) and, on each `catch_up`, whatever was committed since, up to the end the broker
reports at that moment. A consumer that must decide from "everything written before this
record" (a request before its result, a key before its signature) catches up first.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from infra.kafka.clients import make_consumer
from infra.kafka.events import decode_record
from infra.settings import Settings
from schemas.topics import topic_name, topic_spec

CATCH_UP_TIMEOUT_S = 30.0


class TopicFollower:
    """Feeds every decodable event of `topics` to `learn`; undecodable ones are skipped (the
    topic's own consumers dead-letter them)."""

    def __init__(
        self, settings: Settings, topics: Iterable[str], learn: Callable[[Any], None]
    ) -> None:
        self._settings = settings
        self._topics = {topic_name(name, settings.topic_prefix): name for name in topics}
        self._learn = learn
        self._consumer: AIOKafkaConsumer | None = None
        self._partitions: list[TopicPartition] = []

    async def start(self) -> None:
        consumer = make_consumer(self._settings, [], group_id=None)
        await consumer.start()
        self._consumer = consumer
        # The registry's partition counts: `ensure_topics` creates the topics with them.
        self._partitions = [
            TopicPartition(broker_name, partition)
            for broker_name, name in self._topics.items()
            for partition in range(topic_spec(name).partitions)
        ]
        consumer.assign(self._partitions)
        await consumer.seek_to_beginning(*self._partitions)

    async def stop(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None

    async def catch_up(self, timeout_s: float = CATCH_UP_TIMEOUT_S) -> None:
        """Read until every partition is at the end the broker reports now (its last stable
        offset: committed data only). TimeoutError when that takes over `timeout_s`."""
        consumer = self._consumer
        assert consumer is not None, "start() first"
        if not self._partitions:
            return
        end = await consumer.end_offsets(self._partitions)
        deadline = time.monotonic() + timeout_s
        while True:
            behind = [tp for tp in self._partitions if await consumer.position(tp) < end[tp]]
            if not behind:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"could not read {behind[0].topic} to its end in {timeout_s} s")
            batch = await consumer.getmany(*behind, timeout_ms=200, max_records=10_000)
            for records in batch.values():
                for record in records:
                    decoded = decode_record(self._topics[record.topic], record)
                    if decoded.event is not None:
                        self._learn(decoded.event)
