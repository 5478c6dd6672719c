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

Here each batch is one Kafka transaction holding the output records *and* the consumer offsets
(`send_offsets_to_transaction`): either both are committed or neither. The transactional id is
stable per worker, so a restarted worker fences its killed predecessor and the broker aborts the
predecessor's open transaction at once; read-committed consumers never see aborted records.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.errors import ProducerFenced

from infra.kafka.clients import make_producer
from infra.kafka.security import kafka_client_options
from infra.settings import Settings
from pipeline.attribution.processing import Outgoing
from schemas.topics import topic_name

log = logging.getLogger(__name__)

Handler = Callable[[ConsumerRecord], list[Outgoing]]


@dataclass(frozen=True)
class LoopConfig:
    source: str  # logical topic
    group_id: str
    transactional_id: str
    max_records: int = 64  # per transaction
    poll_timeout_ms: int = 500
    session_timeout_ms: int = 10_000  # how soon a killed worker's partitions move on


async def run_transactional_loop(
    settings: Settings,
    config: LoopConfig,
    handler: Handler,
    *,
    stop: asyncio.Event | None = None,
) -> None:
    """Consume `config.source` read-committed and, per batch, send `handler`'s outputs and the
    batch's offsets in one transaction, until `stop` is set or the task is cancelled. The
    handler runs in a thread (it is CPU work) and must not raise for bad input: it turns bad
    input into records (dead letters, failed attributions)."""
    stop = stop or asyncio.Event()
    consumer = AIOKafkaConsumer(
        topic_name(config.source, settings.topic_prefix),
        bootstrap_servers=settings.kafka_bootstrap,
        group_id=config.group_id,
        isolation_level="read_committed",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=config.session_timeout_ms,
        heartbeat_interval_ms=max(1000, config.session_timeout_ms // 3),
        **kafka_client_options(settings),
    )
    producer = make_producer(settings, transactional_id=config.transactional_id)
    await producer.start()
    try:
        await consumer.start()
        try:
            while not stop.is_set():
                batch = await consumer.getmany(
                    timeout_ms=config.poll_timeout_ms, max_records=config.max_records
                )
                if batch:
                    await _process_batch(settings, config, consumer, producer, handler, batch)
        finally:
            await consumer.stop()
    finally:
        await producer.stop()


async def _process_batch(
    settings: Settings,
    config: LoopConfig,
    consumer: AIOKafkaConsumer,
    producer: AIOKafkaProducer,
    handler: Handler,
    batch: dict[TopicPartition, list[ConsumerRecord]],
) -> None:
    try:
        async with producer.transaction():
            for records in batch.values():
                for record in records:
                    for out in await asyncio.to_thread(handler, record):
                        await producer.send(
                            topic_name(out.topic, settings.topic_prefix), out.value, key=out.key
                        )
            offsets = {tp: records[-1].offset + 1 for tp, records in batch.items()}
            await producer.send_offsets_to_transaction(offsets, config.group_id)
    except (asyncio.CancelledError, ProducerFenced):
        raise
    except Exception:
        # The transaction was aborted: rewind to the committed offsets so the batch is redone.
        log.exception("transaction failed; rewinding %s to the committed offsets", config.source)
        await _rewind(consumer, list(batch))
        await asyncio.sleep(1.0)


async def _rewind(consumer: AIOKafkaConsumer, partitions: list[TopicPartition]) -> None:
    for tp in partitions:
        committed = await consumer.committed(tp)
        if committed is None:
            await consumer.seek_to_beginning(tp)
        else:
            consumer.seek(tp, committed)
