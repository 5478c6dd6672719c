"""Results and token deltas back to the gateway requests waiting for them.

One consumer tails every partition of `results` and `token-deltas` from the end (no group, read
committed); each gateway keeps only the records of request ids it produced, and decodes no
other (both topics are keyed by request id), so its work grows with its own requests, not with
the traffic of every gateway. Its own results also tell the cache tier each adapter was last
served from, for `/v1/models`."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError

from infra.kafka.events import decode_record, logical_topic
from infra.settings import Settings
from pipeline.gateway.tailing import start_tail
from schemas.events import CacheTier, InferenceResult, TokenDelta

log = logging.getLogger("loraledger.gateway")

Arrival = TokenDelta | InferenceResult


def new_text(received: str, delta: TokenDelta) -> str:
    """What `delta` adds to the `received` text of its request: nothing for a repeat (a request
    served again after a rebalance), nor past a gap (a delta was lost: the result makes the
    text whole)."""
    if delta.offset > len(received):
        return ""
    overlap = received[delta.offset:]
    if not delta.text.startswith(overlap):
        return ""
    return delta.text[len(overlap):]


class ResultRouter:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._waiting: dict[str, asyncio.Queue[Arrival]] = {}
        self.cache_tiers: dict[str, CacheTier] = {}
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self._consumer = await start_tail(
            self.settings, ["results", "token-deltas"], from_beginning=False
        )
        self._task = asyncio.create_task(self._run(self._consumer), name="gateway-results")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._consumer is not None:
            await self._consumer.stop()

    def expect(self, request_id: str) -> asyncio.Queue[Arrival]:
        """Start collecting what arrives for `request_id` (before producing the request)."""
        queue: asyncio.Queue[Arrival] = asyncio.Queue()
        self._waiting[request_id] = queue
        return queue

    def forget(self, request_id: str) -> None:
        self._waiting.pop(request_id, None)

    @property
    def in_flight(self) -> int:
        return len(self._waiting)

    async def _run(self, consumer: AIOKafkaConsumer) -> None:
        while True:
            try:
                batch = await consumer.getmany(timeout_ms=500)
            except KafkaError as exc:
                log.warning("reading results failed, retrying: %s", exc)
                await asyncio.sleep(0.5)
                continue
            for records in batch.values():
                for record in records:
                    if record.key is None or record.key.decode("utf-8", "replace") not in (
                        self._waiting
                    ):
                        continue
                    decoded = decode_record(logical_topic(self.settings, record.topic), record)
                    if decoded.event is not None:
                        self._route(decoded.event)

    def _route(self, event: Arrival) -> None:
        if isinstance(event, InferenceResult) and event.status == "ok" and event.adapter_id:
            self.cache_tiers[event.adapter_id] = event.cache_tier
        queue = self._waiting.get(event.request_id)
        if queue is not None:
            queue.put_nowait(event)
