"""The attribution processor's transactional loop: its transactional identity names the input
partition, never the instance, so whichever instance owns a partition next fences the one
before; and a loop fenced while the partition is still its own (the broker timed a transaction
out) asks the group again and goes on (against the real broker)."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka import ConsumerRecord, TopicPartition
from task_waits import DEADLINE_S, wait_for

from infra.kafka.clients import make_admin, make_producer
from infra.settings import Settings, load_settings
from pipeline.attribution.agent import loop_config
from pipeline.attribution.loop import LoopConfig, run_transactional_loop
from schemas.topics import TOPICS, topic_name


def _config(worker_id: str, prefix: str):
    return loop_config(load_settings({"LORALEDGER_WORKER_ID": worker_id,
                                      "LORALEDGER_TOPIC_PREFIX": prefix}))


def test_transactional_ids_name_the_partition_not_the_instance():
    one, two = _config("one", "s."), _config("two", "s.")
    tp = TopicPartition("s.results", 3)
    assert one.transactional_id(tp) == two.transactional_id(tp) == (
        "s.loraledger-attribution.s.results.3")
    assert one.transactional_id(tp) != one.transactional_id(TopicPartition("s.results", 4))
    other_stack = _config("one", "t.")
    assert other_stack.transactional_id(TopicPartition("t.results", 3)) != one.transactional_id(tp)


async def _committed_past(settings: Settings, group: str, ends: dict[TopicPartition, int]) -> bool:
    admin = make_admin(settings)
    await admin.start()
    try:
        committed = await admin.list_consumer_group_offsets(group, partitions=list(ends))
    finally:
        await admin.close()
    return all(tp in committed and committed[tp].offset >= end for tp, end in ends.items())


@pytest.mark.integration
def test_a_loop_fenced_without_a_rebalance_rejoins_and_commits_on(kafka_settings: Settings):
    """The broker aborts a transaction left open past its timeout by bumping its producer's
    epoch: a fence, though no other instance owns the partition and no rebalance will come.
    The test bumps every partition's epoch as that abort does; the loop must ask the group
    again, start new producers and commit the records sent after the fence."""
    settings = kafka_settings
    config = LoopConfig(source="results", group_id=f"{settings.topic_prefix}fence-test")
    topic = topic_name("results", settings.topic_prefix)
    partitions = [TopicPartition(topic, p) for p in range(TOPICS["results"].partitions)]
    handled: list[int] = []

    def handle(record: ConsumerRecord) -> list:
        handled.append(record.partition)
        return []

    async def send(count: int) -> None:
        """`count` records, spread evenly over the partitions."""
        producer = make_producer(settings)
        await producer.start()
        try:
            for number in range(count):
                await producer.send_and_wait(topic, b"{}", partition=number % len(partitions))
        finally:
            await producer.stop()

    async def scenario() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(run_transactional_loop(settings, config, handle, stop=stop))
        try:
            await send(len(partitions))
            first = {tp: 1 for tp in partitions}
            await wait_for(lambda: _committed_past(settings, config.group_id, first),
                           "the first records are committed", [task])
            for tp in partitions:
                fencer = make_producer(settings, config.transactional_id(tp))
                await fencer.start()  # init_transactions bumps the epoch
                await fencer.stop()
            await send(2 * len(partitions))
            after = {tp: 3 for tp in partitions}
            await wait_for(lambda: _committed_past(settings, config.group_id, after),
                           "the records sent after the fence are committed", [task])
        finally:
            stop.set()
            await asyncio.wait_for(task, DEADLINE_S)

    asyncio.run(scenario())
    assert len(handled) >= 3 * len(partitions)
