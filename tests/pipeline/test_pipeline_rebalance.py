"""Instances of `loraledger pipeline` joining, and one killed and started again, while records
flow: every instance goes on with the partitions it keeps, none exits, and the pipeline group
commits past every record (against the real broker)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pipeline_process
import pytest
from pipeline_process import wait_until

from infra.kafka.clients import make_producer
from schemas.topics import TOPICS, topic_name

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
READY = "Worker ready"  # Faust logs it when an instance's recovery after a rebalance is done
# The killed-and-restarted test's stream: records are sent back to back, as fast as the broker
# takes them, until the instance started again is ready and this many more went out, or this
# many in all.
MORE_AFTER_READY = 200
STREAM_CAP = 6000


def ready_count(log: Path) -> int:
    return log.read_text(errors="replace").count(READY) if log.exists() else 0


def test_an_instance_keeping_partitions_when_another_joins_goes_on_with_them(
    kafka_settings, stack_env, tmp_path
):
    settings = kafka_settings
    # Governance only: both instances run a Faust agent on `rewards`, and no sink competes
    # for the embedded ledger.
    env = {**stack_env, "PYTHONPATH": str(REPO), "LORALEDGER_HOME": str(tmp_path / "home")}
    first_log, second_log = tmp_path / "first.log", tmp_path / "second.log"
    topic = topic_name("rewards", settings.topic_prefix)

    async def one_record_per_partition() -> None:
        producer = make_producer(settings)
        await producer.start()
        try:
            for partition in range(TOPICS["rewards"].partitions):
                # Not an event: governance dead-letters it, and acknowledges it like any other.
                await producer.send_and_wait(topic, b"not a reward entry", partition=partition)
        finally:
            await producer.stop()

    first = pipeline_process.start_processors(env, first_log, ["governance"])
    second = None
    try:
        wait_until(lambda: ready_count(first_log) >= 1, "the first instance is ready", [first_log])
        second = pipeline_process.start_processors(env, second_log, ["governance"])
        # The first goes through a second recovery once the second joins.
        wait_until(lambda: ready_count(second_log) >= 1 and ready_count(first_log) >= 2,
                   "both instances are ready after the rebalance", [first_log, second_log])
        asyncio.run(one_record_per_partition())
        wait_until(lambda: pipeline_process.consumed(settings, "rewards"),
                   "the group commits past every record", [first_log, second_log])
        for process in (first, second):
            assert process.poll() is None, "an instance exited"
    finally:
        for process in (first, second):
            if process is not None:
                pipeline_process.stop(process)


def test_the_group_commits_past_everything_after_an_instance_is_killed_and_started_again(
    kafka_settings, stack_env, tmp_path
):
    settings = kafka_settings
    env = {**stack_env, "PYTHONPATH": str(REPO), "LORALEDGER_HOME": str(tmp_path / "home")}
    logs = [tmp_path / "a.log", tmp_path / "b.log", tmp_path / "a-again.log"]
    topic = topic_name("rewards", settings.topic_prefix)
    partitions = TOPICS["rewards"].partitions
    flowing = threading.Event()
    sent = [0]

    def stream() -> None:
        # Not events: governance dead-letters them, and acknowledges them like any other.
        async def send() -> None:
            producer = make_producer(settings)
            await producer.start()
            try:
                while flowing.is_set() and sent[0] < STREAM_CAP:
                    await producer.send_and_wait(topic, b"not a reward entry",
                                                 partition=sent[0] % partitions)
                    sent[0] += 1
            finally:
                await producer.stop()
        asyncio.run(send())

    first = pipeline_process.start_processors(env, logs[0], ["governance"])
    second = pipeline_process.start_processors(env, logs[1], ["governance"])
    again = None
    sender = threading.Thread(target=stream)
    try:
        wait_until(lambda: ready_count(logs[0]) >= 1 and ready_count(logs[1]) >= 1,
                   "both instances are ready", logs)
        flowing.set()
        sender.start()
        wait_until(lambda: sent[0] >= 5 * partitions, "the first records are sent", logs)
        pipeline_process.kill(first)
        # Started again before its session expires: the group rebalances twice in a row, once
        # without it and once with it, while records flow.
        again = pipeline_process.start_processors(env, logs[2], ["governance"])
        wait_until(lambda: ready_count(logs[2]) >= 1, "the instance started again is ready", logs)
        # Records keep flowing through the rebalances that follow (the killed member's session
        # expires, and the group settles).
        mark = sent[0]
        wait_until(lambda: sent[0] >= mark + MORE_AFTER_READY or not sender.is_alive(),
                   "more records are sent", logs)
        flowing.clear()
        sender.join()
        wait_until(lambda: pipeline_process.consumed(settings, "rewards"),
                   "the group commits past every record", logs)
        for process in (second, again):
            assert process.poll() is None, "an instance exited"
    finally:
        flowing.clear()
        if sender.is_alive():
            sender.join()
        for process in (first, second, again):
            if process is not None:
                pipeline_process.stop(process)
