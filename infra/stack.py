"""`loraledger stack up | down | status`: the local stack, with no Docker.

Kafka runs as one KRaft node from jars fetched with Maven; ClickHouse is the embedded engine
(chdb) unless CLICKHOUSE_URL names a server, so `up` only has to start the broker, create the
topics from the registry and apply the ClickHouse DDL.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from infra.kafka.broker import StackError, broker_paths, port_open, running_pid, start_broker
from infra.kafka.clients import ensure_topics, make_admin
from infra.kafka.events import publish_sync
from infra.keys import worker_registration
from infra.settings import Settings
from schemas.topics import TOPICS


@dataclass(frozen=True)
class StackStatus:
    broker_pid: int | None
    broker_answers: bool
    topics: list[str]
    bootstrap: str
    clickhouse_url: str


async def _list_topics(settings: Settings) -> list[str]:
    admin = make_admin(settings, request_timeout_ms=5000)
    await admin.start()
    try:
        return sorted(await admin.list_topics())
    finally:
        await admin.close()


def wait_for_broker(settings: Settings, timeout_s: float = 60.0) -> None:
    """Wait until the broker answers a metadata request (the port opens a little earlier)."""
    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            asyncio.run(_list_topics(settings))
            return
        except Exception as exc:  # noqa: BLE001 - any failure means "not ready yet"
            last_error = exc
            time.sleep(1.0)
    raise StackError(f"the broker at {settings.kafka_bootstrap} did not answer: {last_error}")


async def stamp_with_broker_time(settings: Settings) -> None:
    """Give topics whose time is read (`results`, `governance`) log-append timestamps, also
    when they were created before the registry asked for them."""
    specs = [spec for spec in TOPICS.values() if spec.log_append_time]
    admin = make_admin(settings)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        resources = [
            ConfigResource(ConfigResourceType.TOPIC, spec.broker_name(settings.topic_prefix),
                           configs=spec.topic_config())
            for spec in specs
            if spec.broker_name(settings.topic_prefix) in existing
        ]
        if resources:
            await admin.alter_configs(resources)
    finally:
        await admin.close()


def stack_up(settings: Settings, *, start_local_broker: bool = True) -> list[str]:
    """Start what the local stack needs and return the topics created."""
    from infra.clickhouse_client import apply_ddl, get_client

    if start_local_broker:
        start_broker(settings)
    wait_for_broker(settings)
    created = asyncio.run(ensure_topics(settings))
    asyncio.run(stamp_with_broker_time(settings))
    # The local worker's key, so that its results are credited to it.
    publish_sync(settings, [worker_registration(settings.home, settings.worker_id)])
    apply_ddl(get_client(settings))
    return created


def stack_status(settings: Settings) -> StackStatus:
    answers = port_open(settings.kafka_bootstrap)
    topics: list[str] = []
    if answers:
        try:
            topics = asyncio.run(_list_topics(settings))
        except Exception:  # noqa: BLE001 - status reports, it does not fail
            answers = False
    return StackStatus(
        broker_pid=running_pid(broker_paths(settings)),
        broker_answers=answers,
        topics=topics,
        bootstrap=settings.kafka_bootstrap,
        clickhouse_url=settings.clickhouse_url,
    )
