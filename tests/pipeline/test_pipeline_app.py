"""The pipeline's Faust app is built from the settings it is given, with the processors asked
for; nothing is registered at import."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from aiokafka import TopicPartition
from faust.types import TP
from kafka_stack import provisioned_settings, stack_environment
from typer.testing import CliRunner

from infra.kafka.clients import make_consumer, make_producer
from infra.settings import load_settings
from loraledger.cli import app as cli
from pipeline.agents import Processor, build_pipeline
from pipeline.app import (
    _ConsumerThread,
    _ProducerBuffer,
    consumer_group,
    holes_at_head,
    merge_acknowledged,
    seek_to_committed,
)
from schemas.topics import topic_name

GOVERNANCE_TABLES = [
    "earned-entries", "open-proposals", "parameter-history", "used-proposal-ids", "voter-keys",
]


def _settings(tmp_path, prefix: str):
    return load_settings({"LORALEDGER_HOME": str(tmp_path), "LORALEDGER_TOPIC_PREFIX": prefix})


def test_every_processor_by_default_under_the_settings_given(tmp_path):
    settings = _settings(tmp_path, "p1.")
    app = build_pipeline(settings)
    assert app.conf.id == consumer_group(settings) == "p1.loraledger-pipeline"
    assert app.conf.datadir == tmp_path / "faust"
    assert sorted(app.agents.keys()) == ["governance", "governance-earnings", "ledger-sink"]
    assert sorted(app.tables.keys()) == GOVERNANCE_TABLES
    assert len(app._stop_hooks) == 1  # the attribution task ends first


def test_a_worker_runs_only_the_processors_asked_for(tmp_path):
    attribution = build_pipeline(_settings(tmp_path, "p2."), [Processor.ATTRIBUTION])
    assert list(attribution.agents.keys()) == []
    assert list(attribution.tables.keys()) == []
    assert len(attribution._stop_hooks) == 1
    governance = build_pipeline(_settings(tmp_path, "p3."), [Processor.GOVERNANCE])
    assert sorted(governance.agents.keys()) == ["governance", "governance-earnings"]
    assert sorted(governance.tables.keys()) == GOVERNANCE_TABLES
    assert governance._stop_hooks == []


def test_the_app_authenticates_as_governance_when_governance_runs_in_it_else_as_the_sink(tmp_path):
    def principal(processors, env=None):
        settings = load_settings({"LORALEDGER_HOME": str(tmp_path), **(env or {})})
        return build_pipeline(settings, processors).kafka_settings.principal

    assert principal(list(Processor)) == "governance"
    assert principal([Processor.GOVERNANCE]) == "governance"
    assert principal([Processor.SINK]) == principal([Processor.ATTRIBUTION]) == "sink"
    # LORALEDGER_PRINCIPAL chooses one for the whole process.
    assert principal([Processor.SINK], {"LORALEDGER_PRINCIPAL": "admin"}) == "admin"


def test_the_command_refuses_an_unknown_processor():
    result = CliRunner().invoke(cli, ["pipeline", "--processor", "rewards"])
    assert result.exit_code == 2
    assert "rewards" in result.output


@pytest.mark.integration
def test_changelog_seek_starts_an_unbuilt_partition_from_its_beginning(tmp_path):
    # Faust seeks a standby changelog partition that a rebalance added mid-recovery with the
    # offset None; that must read it from the beginning, not crash the worker.
    settings = provisioned_settings(stack_environment(tmp_path / "clickhouse"))
    topic = topic_name("results", settings.topic_prefix)
    unbuilt, built = TP(topic, 0), TP(topic, 1)  # Faust's partitions, as its recovery has them
    thread = SimpleNamespace(
        consumer=SimpleNamespace(_read_offset={unbuilt: 5}),
        app=SimpleNamespace(conf=SimpleNamespace(broker_request_timeout=60.0)),
    )

    async def seek() -> tuple[int, int]:
        producer = make_producer(settings)
        await producer.start()
        try:
            for partition in (0, 1):
                for _ in range(3):
                    await producer.send_and_wait(topic, b"row", partition=partition)
        finally:
            await producer.stop()
        consumer = make_consumer(settings, [], group_id=None)
        await consumer.start()
        try:
            ours = [TopicPartition(topic, 0), TopicPartition(topic, 1)]
            consumer.assign(ours)
            await consumer.seek_to_end(*ours)
            await _ConsumerThread._seek_wait(thread, consumer, {unbuilt: None, built: 2})
            return await consumer.position(unbuilt), await consumer.position(built)
        finally:
            await consumer.stop()

    assert asyncio.run(seek()) == (0, 2)
    assert thread.consumer._read_offset == {built: 2}


@pytest.mark.integration
def test_the_seek_to_committed_offsets_starts_a_partition_nobody_committed_from_its_beginning(
    tmp_path,
):
    # Records fetched and then dropped when a rebalance stopped the flow are fetched again by
    # this seek. A partition without a committed offset must go back too, not stay past them.
    settings = provisioned_settings(stack_environment(tmp_path / "clickhouse"))
    topic = topic_name("results", settings.topic_prefix)
    never, committed = TopicPartition(topic, 0), TopicPartition(topic, 1)
    changelog = TopicPartition(topic_name("attributions", settings.topic_prefix), 0)

    async def seek() -> tuple[dict, int, int]:
        producer = make_producer(settings)
        await producer.start()
        try:
            for tp in (never, committed, changelog):
                for _ in range(3):
                    await producer.send_and_wait(tp.topic, b"row", partition=tp.partition)
        finally:
            await producer.stop()
        consumer = make_consumer(settings, [], group_id=f"{settings.topic_prefix}seek-test")
        await consumer.start()
        try:
            consumer.assign([never, committed, changelog])
            await consumer.commit({committed: 2})
            # Fetched to the end: partition 0 from its beginning, partition 1 from offset 2.
            last = {never: -1, committed: -1, changelog: -1}
            while min(last.values()) < 2:
                fetched = await consumer.getmany(timeout_ms=30_000)
                assert fetched, "the records sent were not fetched"
                last.update({tp: records[-1].offset for tp, records in fetched.items()})
            # A table's changelog (any topic named as one) keeps its position.
            offsets = await seek_to_committed(consumer, [changelog.topic])
            return offsets, [await consumer.position(tp) for tp in (never, committed, changelog)]
        finally:
            await consumer.stop()

    offsets, positions = asyncio.run(seek())
    assert offsets == {never: None, committed: 2, changelog: None}
    assert positions == [0, 2, 3]


def test_a_hole_after_the_committed_offset_with_nothing_in_flight_is_reported():
    holes, filled, waiting, contiguous, never = (TP("rewards", n) for n in range(5))
    acked = {holes: [15, 16, 17], filled: [16, 17], waiting: [15, 16], contiguous: [14, 15],
             never: [3, 4]}
    # Faust's gaps: offsets known to hold no record (markers), counted as acknowledged.
    gaps = {filled: [SimpleNamespace(begin=14, end=16)]}
    committed = {holes: 13, filled: 13, waiting: 13, contiguous: 13, never: None}
    in_flight = [(waiting, 14), (holes, 20)]  # an unfinished record below the head, or above

    assert holes_at_head(acked, gaps, committed, in_flight) == {holes: 13}


def test_acknowledged_offsets_and_gaps_merge_into_one_run_without_duplicates():
    from faust.transport.consumer import IntervalTree

    # Records at 4-6 and 8-9, a transaction marker at 7; Faust's gap for the marker ends at
    # the record that revealed it (8), which is acknowledged too.
    acked, gaps = [4, 5, 6, 8, 9], IntervalTree()
    gaps.addi(7, 9)
    gaps.addi(20, 22)  # past everything acknowledged: kept for later
    merge_acknowledged(acked, gaps)

    assert acked == [4, 5, 6, 7, 8, 9]
    assert sorted((i.begin, i.end) for i in gaps) == [(20, 22)]


def test_the_table_write_buffer_drains_with_the_write_in_flight_and_drops_writes_once_closed(
    tmp_path,
):
    # Faust's background task has taken one write off the buffer and is still sending it; two
    # more wait. Draining (before a transactional commit) sends both and waits for the third.
    assert isinstance(build_pipeline(_settings(tmp_path, "p4.")).producer.buffer, _ProducerBuffer)

    async def scenario() -> list[str]:
        published: list[str] = []
        release, queued_sent = asyncio.Event(), asyncio.Event()

        class Channel:
            async def publish_message(self, fut, wait: bool) -> None:
                if fut.name == "in flight":
                    await release.wait()
                published.append(fut.name)
                if fut.name == "queued 2":
                    queued_sent.set()

        def write(name: str) -> SimpleNamespace:
            return SimpleNamespace(name=name, message=SimpleNamespace(channel=Channel()))

        buffer = _ProducerBuffer()
        buffer.app = SimpleNamespace(conf=SimpleNamespace(producer_threaded=False))
        in_flight = asyncio.create_task(buffer._send_pending(write("in flight")))
        buffer.put(write("queued 1"))
        buffer.put(write("queued 2"))
        draining = asyncio.create_task(buffer.drain())
        await queued_sent.wait()
        assert buffer.size == 0
        assert not draining.done()  # the write in flight is not sent yet
        release.set()
        await asyncio.gather(draining, in_flight)
        # After the last commit at stop no transaction is open: a write is dropped (its event is
        # not committed, and is processed again), not sent into an error that crashes the app.
        buffer.closed = True
        await buffer._send_pending(write("after the last commit"))
        return published

    assert asyncio.run(scenario()) == ["queued 1", "queued 2", "in flight"]
