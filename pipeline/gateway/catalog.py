"""The adapters a gateway can serve: every AdapterRegistered on the compacted `adapters` topic,
read from the beginning and then followed, so a gateway on any machine knows them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError

from infra.kafka.events import decode_record
from infra.settings import Settings
from pipeline.gateway.tailing import start_tail
from schemas.events import AdapterRegistered

log = logging.getLogger("loraledger.gateway")


class AdapterCatalog:
    def __init__(self, settings: Settings, catch_up_s: float = 2.0) -> None:
        self.settings = settings
        self.catch_up_s = catch_up_s
        self.adapters: dict[str, AdapterRegistered] = {}
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self._consumer = await start_tail(self.settings, ["adapters"], from_beginning=True)
        self._task = asyncio.create_task(self._run(self._consumer), name="gateway-adapters")
        await self.catch_up()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._consumer is not None:
            await self._consumer.stop()

    async def lookup(self, adapter_id: str) -> AdapterRegistered | None:
        """The adapter's registration; an id not seen yet is looked for up to the topic's
        current end, so an adapter registered a moment ago is found."""
        if adapter_id not in self.adapters:
            await self.catch_up()
        return self.adapters.get(adapter_id)

    async def catch_up(self) -> None:
        """Wait (bounded) until everything on `adapters` as of now has been read."""
        consumer = self._consumer
        if consumer is None:
            return
        partitions = list(consumer.assignment())
        try:
            ends = await consumer.end_offsets(partitions)
        except KafkaError as exc:
            log.warning("could not read the end of the adapters topic: %s", exc)
            return
        deadline = time.monotonic() + self.catch_up_s
        while time.monotonic() < deadline:
            positions = [await consumer.position(tp) for tp in ends]
            if all(position >= end for position, end in zip(positions, ends.values(),
                                                               strict=True)):
                return
            await asyncio.sleep(0.02)

    async def _run(self, consumer: AIOKafkaConsumer) -> None:
        while True:
            try:
                batch = await consumer.getmany(timeout_ms=500)
            except KafkaError as exc:
                log.warning("reading adapters failed, retrying: %s", exc)
                await asyncio.sleep(0.5)
                continue
            for records in batch.values():
                for record in records:
                    decoded = decode_record("adapters", record)
                    if decoded.event is not None:
                        self.adapters[decoded.event.adapter_id] = decoded.event
