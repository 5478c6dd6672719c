"""A transactional consume -> process -> produce loop on aiokafka, the attribution agent's
delivery mechanism.

Why not Faust's own `processing_guarantee="exactly_once"`: Faust binds a sent record to the
transaction of the *destination* partition's group (`TransactionManager.send`), which only
exists for topics the app itself consumes with the same partitioning (table changelogs). A
record sent to another topic (`attributions`, keyed by request id, or `rewards`, keyed by
beneficiary, from `results`, keyed by adapter id) is written outside the transaction that
commits the input offset, so a worker killed between the two leaves a visible record whose
input is processed again after the restart: a duplicate (for rewards, a payment made twice).
(Measured against the Kafka 4.1 broker: a SIGKILL mid-run duplicated records.)

Here each input partition's share of a batch is one Kafka transaction holding the output
records *and* the consumer offset (`send_offsets_to_transaction`): either both are committed or
neither. Each assigned input partition has its own transactional producer whose id names the
partition (`<group>.<topic>.<partition>`), as the inference worker does: whoever owns the
partition next starts a producer with the same id, which fences the previous owner (a killed
instance, or a paused zombie that wakes after a rebalance: the offset commit in a transaction
carries no group generation, so only the transactional id can stop it) and aborts its open
transaction; read-committed consumers never see aborted records. So any number of instances
share the input through the consumer group, and none needs an identity of its own.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiokafka import (
    AIOKafkaConsumer,
    AIOKafkaProducer,
    ConsumerRebalanceListener,
    ConsumerRecord,
    TopicPartition,
)
from aiokafka.errors import ProducerFenced

from infra.kafka.clients import make_consumer, make_producer
from infra.kafka.consumer_group import request_rejoin, rewind_to_committed
from infra.kafka.events import Outgoing
from infra.kafka.transactions import send_and_commit
from infra.settings import Settings
from schemas.topics import topic_name

log = logging.getLogger(__name__)

Handler = Callable[[ConsumerRecord], list[Outgoing]]
# Runs before each batch's handler, in the transaction's scope: an exception aborts the batch.
Prepare = Callable[[], Awaitable[None]]


@dataclass(frozen=True)
class LoopConfig:
    source: str  # logical topic
    group_id: str
    max_records: int = 64  # per poll
    poll_timeout_ms: int = 500
    session_timeout_ms: int = 10_000  # how soon a killed instance's partitions move on

    def transactional_id(self, partition: TopicPartition) -> str:
        """Stable per input partition, so the partition's next owner fences the previous one."""
        return f"{self.group_id}.{partition.topic}.{partition.partition}"


class _PartitionProducers(ConsumerRebalanceListener):
    """One transactional producer per assigned input partition: started on assignment (which
    fences the partition's previous owner), stopped on revocation. `lock` is held around each
    batch, so a revocation waits for the open transactions to end. A producer is never started
    at any other time: one started by an instance the group has already moved on from would
    fence the partition's rightful owner."""

    def __init__(self, settings: Settings, config: LoopConfig) -> None:
        self.settings = settings
        self.config = config
        self.lock = asyncio.Lock()
        self.producers: dict[TopicPartition, AIOKafkaProducer] = {}
        self.failure: Exception | None = None  # of an assignment; aiokafka would swallow it

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        async with self.lock:
            await self.drop(list(revoked))

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        async with self.lock:
            await self.drop([tp for tp in self.producers if tp not in assigned])
            for tp in assigned:
                if tp in self.producers:
                    continue
                producer = make_producer(
                    self.settings, transactional_id=self.config.transactional_id(tp)
                )
                try:
                    await producer.start()  # init_transactions fences the previous owner
                except Exception as exc:
                    await producer.stop()
                    self.failure = exc  # the loop raises it and starts over
                    return
                self.producers[tp] = producer
        log.info("%s owns partitions %s", self.config.group_id,
                 sorted(tp.partition for tp in assigned))

    async def drop(self, partitions: list[TopicPartition]) -> None:
        stopping = [self.producers.pop(tp) for tp in partitions if tp in self.producers]
        await asyncio.gather(*(producer.stop() for producer in stopping), return_exceptions=True)


async def run_transactional_loop(
    settings: Settings,
    config: LoopConfig,
    handler: Handler,
    *,
    stop: asyncio.Event | None = None,
    prepare: Prepare | None = None,
) -> None:
    """Consume `config.source` read-committed and, per input partition of each batch, send
    `handler`'s outputs and the partition's offset in one transaction, until `stop` is set or
    the task is cancelled. The handler runs in a thread (it is CPU work) and must not raise
    for bad input: it turns bad input into records (dead letters, failed attributions).
    `prepare` runs before each batch (the processor catches its lookup state up there)."""
    stop = stop or asyncio.Event()
    producers = _PartitionProducers(settings, config)
    consumer = make_consumer(
        settings,
        [],
        config.group_id,
        session_timeout_ms=config.session_timeout_ms,
        heartbeat_interval_ms=max(1000, config.session_timeout_ms // 3),
    )
    consumer.subscribe([topic_name(config.source, settings.topic_prefix)], listener=producers)
    try:
        await consumer.start()
        while not stop.is_set():
            batch = await consumer.getmany(
                timeout_ms=config.poll_timeout_ms, max_records=config.max_records
            )
            if producers.failure is not None:
                raise producers.failure  # the caller starts over, with a fresh assignment
            if not batch:
                continue
            async with producers.lock:
                if not await _prepared(consumer, prepare, list(batch)):
                    continue
                for tp, records in batch.items():
                    producer = producers.producers.get(tp)
                    if producer is not None:  # else revoked while the batch was fetched
                        await _process_partition(
                            settings, config, consumer, producers, producer, handler, records
                        )
    finally:
        try:
            await consumer.stop()
        finally:
            await producers.drop(list(producers.producers))


async def _prepared(
    consumer: AIOKafkaConsumer, prepare: Prepare | None, partitions: list[TopicPartition]
) -> bool:
    """Run `prepare` before a batch; if it fails, rewind the batch so it is read again."""
    if prepare is None:
        return True
    try:
        await prepare()
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("catching up before a batch failed; rewinding %s", partitions)
        await rewind_to_committed(consumer, partitions)
        await asyncio.sleep(1.0)
        return False
    return True


async def _process_partition(
    settings: Settings,
    config: LoopConfig,
    consumer: AIOKafkaConsumer,
    producers: _PartitionProducers,
    producer: AIOKafkaProducer,
    handler: Handler,
    records: list[ConsumerRecord],
) -> None:
    tp = TopicPartition(records[0].topic, records[0].partition)
    try:
        outgoing = [
            message for record in records for message in await asyncio.to_thread(handler, record)
        ]
        await send_and_commit(
            producer, settings, outgoing, {tp: records[-1].offset + 1}, config.group_id
        )
    except asyncio.CancelledError:
        raise
    except ProducerFenced:
        # Either a zombie (the group gave the partition to another instance, whose producer
        # fenced ours) or a transaction the broker timed out. Read no more of it and ask the
        # group: a partition still ours gets a new producer and resumes from its committed
        # offset, one that is not stays with its new owner.
        log.warning("%s partition %d was fenced; rejoining the group", config.source,
                    tp.partition)
        consumer.pause(tp)
        await producers.drop([tp])
        request_rejoin(consumer)
    except Exception:
        # The transaction was aborted: rewind to the committed offset so the batch is redone.
        log.exception("transaction failed; rewinding %s to the committed offset", tp)
        await rewind_to_committed(consumer, [tp])
        await asyncio.sleep(1.0)

