"""The pipeline's Faust app, built by `build_app(settings)`. Each processor module exposes
`register(app, settings, ...)`, which declares its topics, tables, agents and tasks on the app
it is given; `pipeline.agents.build_pipeline` builds the app and registers the processors a
worker runs. Nothing is built or read from the environment at import.

Stopping (SIGTERM, Ctrl-C) under `exactly_once` runs in this order:

1. the stop hooks (`stop_first`): the app's own transactional loops (the attribution task)
   finish their open transaction, commit and close, while the Faust consumer still runs;
2. Faust stops fetching, and `_consumer_wait_empty` waits until every event the agents took
   has been processed and acknowledged (the ledger sink writes its current batch), committing
   as it goes;
3. one last commit ends the transactions, and the consumer commits nothing after it; then
   the agents are stopped.

Faust 0.15.3 ends the transactions at the end of 2, but its streams keep acknowledging
events afterwards: those that flow control makes them skip (unprocessed) and, once the agents
are cancelled, those they were holding. The consumer's own stop then commits these, into
producers that are no longer in a transaction: `IllegalOperation('Not in the middle of a
transaction')`. That abandons the consumer's stop before its fetcher thread stops, and the
thread keeps the process alive after the event loop has closed (the hang). Had the commit
gone through, it would have marked skipped events as done.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, NoReturn

import faust
from aiokafka import TopicPartition
from faust.transport.drivers import aiokafka as faust_aiokafka

from infra.kafka.security import faust_credentials
from infra.settings import Settings
from schemas.topics import topic_spec

log = logging.getLogger(__name__)

StopHook = Callable[[], Awaitable[None]]

STOP_HOOK_TIMEOUT_S = 15.0  # a hook that takes longer is abandoned; its transaction aborts
# Events not acknowledged within these bounds stay uncommitted and are processed again after a
# restart: giving up early costs a redo, never an event.
DRAIN_TIMEOUT_S = 15.0
DRAIN_STALL_S = 3.0  # with no acknowledgement at all


class _ConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    async def _highwaters(self, partitions: list[Any]) -> Any:
        # Faust 0.15.3 takes a transactional app's changelog highwaters from the consumer's
        # fetch state (`last_stable_offset`), which is empty for a partition not fetched since
        # the last rebalance: the highwater reads -1. Recovery then thinks there is nothing to
        # read (a table, the governance parameters among them, starts incomplete), and a table
        # already holding offset 9 of a partition fails the consistency check ("9 > -1") when
        # an instance joins or leaves the group. The consumer reads committed, so the end
        # offset the broker reports is the last stable offset, fetched or not.
        return await self._ensure_consumer().end_offsets(partitions)

    async def _seek_wait(self, consumer: Any, partitions: Mapping[Any, int | None]) -> None:
        # Faust 0.15.3 seeks the standby changelog partitions it holds, including one a
        # rebalance added while recovery ran, whose start offset was never built: it is still
        # None, aiokafka's seek raises ValueError and the worker crashes. A partition with
        # nothing read yet starts from its beginning, as a built offset of -1 would have.
        unread = [tp for tp, offset in partitions.items() if offset is None or offset < 0]
        if unread:
            # aiokafka's seek_to_beginning takes its own TopicPartition only, not Faust's TP.
            await consumer.seek_to_beginning(
                *(TopicPartition(tp.topic, tp.partition) for tp in unread)
            )
        read_offsets = self.consumer._read_offset
        for tp, offset in partitions.items():
            if tp in unread:
                read_offsets.pop(tp, None)
                continue
            consumer.seek(tp, offset)
            if offset > 0:
                read_offsets[tp] = offset
            else:
                read_offsets.pop(tp, None)
        await asyncio.wait_for(
            asyncio.gather(*[consumer.position(tp) for tp in partitions]),
            timeout=self.app.conf.broker_request_timeout,
        )


class _Consumer(faust_aiokafka.Consumer):
    def _new_consumer_thread(self) -> _ConsumerThread:
        return _ConsumerThread(self, loop=self.loop, beacon=self.beacon)


class _Transport(faust_aiokafka.Transport):
    Consumer = _Consumer


class PipelineApp(faust.App):
    """faust.App with the stop order above, and changelog highwaters read from the broker."""

    def __init__(self, *args: Any, kafka_settings: Settings, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._stop_hooks: list[StopHook] = []
        self.kafka_settings = kafka_settings  # its principal: the app's own Kafka clients'

    def main(self) -> NoReturn:
        """Run the Faust worker, authenticated as its settings' principal (read only now, so
        building an app needs no credentials)."""
        self.conf.broker_credentials = faust_credentials(self.kafka_settings)
        super().main()

    def stop_first(self, hook: StopHook) -> StopHook:
        """Register `hook` to run (and be awaited) first when the app stops."""
        self._stop_hooks.append(hook)
        return hook

    def _new_transport(self) -> _Transport:
        return _Transport(self.conf.broker_consumer, self)

    async def on_stop(self) -> None:
        for hook in self._stop_hooks:
            try:
                await asyncio.wait_for(hook(), STOP_HOOK_TIMEOUT_S)
            except Exception:
                log.exception("stop hook %s failed", getattr(hook, "__qualname__", hook))
        await super().on_stop()

    async def _consumer_wait_empty(self, consumer: Any, logger: Any) -> None:
        if not self.in_transaction:
            await super()._consumer_wait_empty(consumer, logger)
            return
        logger.info("Wait for streams...")
        # Faust's own wait loop (Consumer.wait_empty), minus its final commit that ends the
        # transactions: that one must come after the last event is processed.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DRAIN_TIMEOUT_S
        last_progress, waiting = loop.time(), len(consumer._unacked_messages)
        while consumer._unacked_messages:
            now = loop.time()
            if len(consumer._unacked_messages) < waiting:
                last_progress, waiting = now, len(consumer._unacked_messages)
            # An event read by two agents can stay unacknowledged for good (one agent's queue
            # copy was cleared when the flow stopped); stop waiting once nothing moves.
            if now > deadline or now - last_progress > DRAIN_STALL_S:
                stuck = Counter(message.topic for message in consumer._unacked_messages)
                logger.info("%s unprocessed at stop, redone after a restart", dict(stuck))
                break
            await consumer.commit()
            if not consumer._unacked_messages:
                break
            await consumer._wait_for_ack(timeout=1)
            consumer._clean_unacked_messages()
        await consumer.commit_and_end_transactions()
        # From here on an acknowledgement is not a processed event: the streams acknowledge
        # what flow control makes them skip and what they drop when cancelled. Committing
        # those would lose them, and would fail anyway (no transaction is open).
        consumer.commit = _no_commit
        await self.agents.stop()


async def _no_commit(*args: Any, **kwargs: Any) -> bool:
    return False


def consumer_group(settings: Settings) -> str:
    """The app's id, which is also its Kafka consumer group: one per stack (topic prefix)."""
    return f"{settings.topic_prefix}loraledger-pipeline"


def build_app(settings: Settings, replicas: int = 1) -> PipelineApp:
    """A Faust app with nothing registered on it yet; its own consumer and producers
    authenticate as the settings' principal. The topics it creates (table changelogs) get
    `replicas` copies (`infra.kafka.clients.cluster_replication` says how many a cluster gives;
    the brokers' `min.insync.replicas` applies to them)."""
    return PipelineApp(
        consumer_group(settings),
        kafka_settings=settings,
        broker=[f"kafka://{server}" for server in settings.kafka_bootstrap.split(",")],
        processing_guarantee="exactly_once",
        store="memory://",  # tables are rebuilt from their changelog topics on start
        datadir=str(settings.home / "faust"),
        topic_partitions=8,
        topic_replication_factor=replicas,
        consumer_auto_offset_reset="earliest",
        web_enabled=False,
        autodiscover=False,
        # A restarted worker rejoins its group after the old session expires; Faust's 60 s
        # default would stall every restart for a minute.
        broker_session_timeout=10,
    )


def registry_topic(app: faust.App, name: str, topic_prefix: str) -> faust.TopicT:
    """A registry topic under `topic_prefix`, read as raw bytes: agents decode once at the
    boundary so that an invalid value goes to the dead letters instead of crashing the agent."""
    spec = topic_spec(name)
    return app.topic(
        spec.broker_name(topic_prefix),
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
        partitions=spec.partitions,
        internal=False,
    )
