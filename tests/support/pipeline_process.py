"""`loraledger pipeline` as a subprocess for integration tests, and waits on what the broker
says about its progress. Every wait polls a condition under a deadline."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from aiokafka import AIOKafkaConsumer, TopicPartition

from infra.kafka.clients import make_admin
from infra.kafka.events import read_topic
from infra.kafka.security import kafka_client_options
from infra.settings import Settings
from pipeline.app import consumer_group

# What an instance logs once its attribution processor holds partitions.
OWNS_PARTITIONS = re.compile(r"loraledger-attribution owns partitions \[\d")


def start(env: dict[str, str], log: Path) -> subprocess.Popen:
    """Every processor (governance, attribution, the sink) in one worker, its output appended
    to `log`."""
    return start_processors(env, log, [])


def start_processors(env: dict[str, str], log: Path, processors: list[str]) -> subprocess.Popen:
    """`loraledger pipeline` running `processors` (all of them when empty), its output
    appended to `log`."""
    chosen = [arg for name in processors for arg in ("-p", name)]
    return subprocess.Popen(
        [sys.executable, "-m", "loraledger.cli", "pipeline", "-l", "info", *chosen],
        env=env, cwd=log.parent, stdout=log.open("ab"), stderr=subprocess.STDOUT,
    )


def stop(process: subprocess.Popen, bound_s: float = 60.0) -> int:
    """SIGTERM, then SIGKILL if it is still running after `bound_s`; the exit code."""
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(bound_s)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


def kill(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGKILL)
        process.wait()


def wait_until(condition: Callable[[], bool], what: str, log: Path | list[Path],
               timeout_s: float = 180.0) -> None:
    """Poll `condition` until it holds; past the deadline, fail with the tail of each log."""
    logs = [log] if isinstance(log, Path) else log
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            tails = "\n".join(f"{path.name}: {path.read_text(errors='replace')[-3000:]}"
                              for path in logs if path.exists())
            raise AssertionError(f"timed out waiting until {what}; logs:\n{tails}")
        time.sleep(0.5)


def committed_events(settings: Settings, topic: str) -> list:
    """The decodable events of `topic`, committed records only."""
    async def read() -> list:
        return [item.event async for item in read_topic(settings, topic, idle_timeout_s=2.0)
                if item.event is not None]
    return asyncio.run(read())


async def _progress(
    settings: Settings, group: str, topics: tuple[str, ...]
) -> dict[TopicPartition, tuple[int | None, int]]:
    """Per partition of `topics` that holds records: (the offset `group` committed, None when
    none, and the offset of its last record)."""
    last: dict[TopicPartition, int] = {}
    for topic in topics:
        async for item in read_topic(settings, topic, idle_timeout_s=2.0):
            tp = TopicPartition(item.record.topic, item.record.partition)
            last[tp] = max(last.get(tp, -1), item.record.offset)
    admin = make_admin(settings)
    await admin.start()
    try:
        committed = await admin.list_consumer_group_offsets(group, partitions=list(last))
    finally:
        await admin.close()
    return {tp: (committed[tp].offset if tp in committed else None, offset)
            for tp, offset in last.items()}


def _behind(progress: dict[TopicPartition, tuple[int | None, int]]) -> dict:
    return {tp: (at, last) for tp, (at, last) in progress.items() if at is None or at <= last}


async def _consumed(settings: Settings, group: str, topics: tuple[str, ...]) -> bool:
    progress = await _progress(settings, group, topics)
    return bool(progress) and not _behind(progress)


def consumed(settings: Settings, *topics: str) -> bool:
    """Whether the pipeline's group has committed past every record of `topics`: every agent
    reading them (the ledger sink among them) is done with them."""
    return asyncio.run(_consumed(settings, consumer_group(settings), topics))


def group_unconsumed(settings: Settings, group: str, *topics: str) -> list[str]:
    """The partitions of `topics` that `group` has not committed past, each as
    "topic[partition] committed C, last record L"."""
    behind = _behind(asyncio.run(_progress(settings, group, topics)))
    return [f"{tp.topic}[{tp.partition}] committed {at}, last record {last}"
            for tp, (at, last) in sorted(behind.items())]


def table_changelog(settings: Settings, table: str) -> dict:
    """A Faust table as the pipeline recovers it on start: the last committed value per key
    of its changelog (keys and values JSON), without the keys deleted last."""
    async def read() -> dict:
        consumer = AIOKafkaConsumer(
            f"{consumer_group(settings)}-{table}-changelog",
            bootstrap_servers=settings.kafka_bootstrap, group_id=None,
            isolation_level="read_committed", enable_auto_commit=False,
            auto_offset_reset="earliest", **kafka_client_options(settings),
        )
        await consumer.start()
        state: dict = {}
        try:
            while batch := await consumer.getmany(timeout_ms=3000):
                for records in batch.values():
                    for record in records:
                        key = json.loads(record.key)
                        if record.value is None:
                            state.pop(key, None)
                        else:
                            state[key] = json.loads(record.value)
        finally:
            await consumer.stop()
        return state
    return asyncio.run(read())
