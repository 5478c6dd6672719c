"""The gateway's connection to Kafka: a producer of `requests`, the result router and the
adapter catalog, (re)connected in the background so the gateway starts, and answers 503, while
the broker is unreachable."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from aiokafka import AIOKafkaProducer

from infra.kafka.clients import ensure_topics, make_producer
from infra.kafka.events import Outgoing
from infra.settings import Settings
from pipeline.gateway.catalog import AdapterCatalog
from pipeline.gateway.results import ResultRouter
from schemas.codec import encode
from schemas.events import InferenceRequest
from schemas.topics import topic_name

log = logging.getLogger("loraledger.gateway")

GATEWAY_TOPICS = ["requests", "results", "token-deltas", "adapters"]


class BrokerUnavailable(Exception):
    pass


class KafkaLink:
    def __init__(self, settings: Settings, produce_timeout_s: float = 5.0,
                 retry_s: float = 1.0) -> None:
        self.settings = settings
        self.produce_timeout_s = produce_timeout_s
        self.retry_s = retry_s
        self.producer: AIOKafkaProducer | None = None
        self.router = ResultRouter(settings)
        self.catalog = AdapterCatalog(settings)
        self.connected = asyncio.Event()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._connect_until_done(), name="gateway-connect")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._close()

    def ready(self) -> bool:
        return self.connected.is_set()

    async def produce(self, request: InferenceRequest) -> None:
        """Put the request on `requests` and wait for the broker's acknowledgement."""
        if self.producer is None or not self.ready():
            raise BrokerUnavailable()
        message = Outgoing.of(request)
        try:
            await asyncio.wait_for(
                self.producer.send_and_wait(
                    topic_name(message.topic, self.settings.topic_prefix),
                    encode(request),
                    key=message.key,
                ),
                self.produce_timeout_s,
            )
        except Exception as exc:  # a timeout or any client error: the broker did not take it
            raise BrokerUnavailable() from exc

    async def _connect_until_done(self) -> None:
        while True:
            try:
                await self._connect()
                self.connected.set()
                log.info("gateway connected to %s", self.settings.kafka_bootstrap)
                return
            except Exception as exc:
                log.warning("Kafka at %s unreachable, retrying: %s",
                            self.settings.kafka_bootstrap, exc)
                await self._close()
                await asyncio.sleep(self.retry_s)

    async def _connect(self) -> None:
        await ensure_topics(self.settings, GATEWAY_TOPICS)
        self.producer = make_producer(self.settings)
        await self.producer.start()
        await self.router.start()
        await self.catalog.start()

    async def _close(self) -> None:
        self.connected.clear()
        await self.catalog.stop()
        await self.router.stop()
        if self.producer is not None:
            await self.producer.stop()
        self.producer = None
        self.router = ResultRouter(self.settings)
        self.catalog = AdapterCatalog(self.settings)
