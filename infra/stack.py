"""`loraledger stack up | down | status`: the local stack, with no Docker.

Kafka runs as one KRaft node (or, with `--brokers N`, a cluster of N nodes on loopback) from
jars fetched with Maven; the ledger is the local ledger server (ClickHouse's HTTP interface over
the embedded engine) unless CLICKHOUSE_URL names another server or a chdb:// directory, so `up`
only has to start the brokers and the ledger server, create the topics from the registry,
provision the principals (password files, SCRAM credentials, ACLs), register the local worker's
key (as the admin: only the admin and the worker principal may write `workers`) and apply the
ClickHouse DDL. Every step is idempotent, and all but starting the brokers also work on a broker
started elsewhere (`--external`), given its admin's password.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from infra.kafka.broker import (
    StackError,
    local_nodes,
    port_open,
    quorum_leader,
    running_pid,
    start_broker,
)
from infra.kafka.clients import ensure_topics, make_admin
from infra.kafka.events import publish_sync
from infra.kafka.provisioning import provision
from infra.kafka.security import ADMIN, ensure_credentials, scram_enabled
from infra.keys import worker_registration
from infra.ledger_server.process import ledger_answers, ledger_paths, start_ledger
from infra.ledger_server.process import running_pid as ledger_pid
from infra.settings import Settings, redact_url
from schemas.topics import TOPICS


@dataclass(frozen=True)
class NodeStatus:
    node_id: int
    address: str
    pid: int | None  # None: not started by this home (or not running)
    answers: bool


@dataclass(frozen=True)
class StackStatus:
    nodes: list[NodeStatus]  # this home's local nodes; one entry for an external broker
    controller: int | None  # the node leading the KRaft quorum, when it can be asked
    under_replicated: list[str]  # "topic/partition" with fewer in-sync replicas than replicas
    topics: list[str]
    bootstrap: str
    security: str
    clickhouse_url: str  # its password redacted
    local_ledger: bool  # CLICKHOUSE_URL is this stack's ledger server, so `up` starts it
    ledger_pid: int | None
    ledger_answers: bool

    @property
    def answers(self) -> bool:
        return any(node.answers for node in self.nodes)


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


async def under_replicated_partitions(settings: Settings) -> list[str]:
    """The partitions (`topic/partition`) with fewer in-sync replicas than replicas."""
    admin = make_admin(settings, request_timeout_ms=5000)
    await admin.start()
    try:
        topics = await admin.describe_topics()
    finally:
        await admin.close()
    return sorted(
        f"{topic['topic']}/{partition['partition']}"
        for topic in topics
        for partition in topic["partitions"]
        if len(partition["isr"]) < len(partition["replicas"])
    )


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


def stack_up(
    settings: Settings, *, start_local_broker: bool = True, brokers: int = 1
) -> list[str]:
    """Start what the local stack needs (`brokers` local nodes) and return the topics
    created. Runs as the admin principal unless LORALEDGER_PRINCIPAL says otherwise."""
    from infra.clickhouse_client import apply_ddl, get_client

    settings = settings.acting_as(ADMIN)
    if scram_enabled(settings):
        ensure_credentials(settings)
    if start_local_broker:
        start_broker(settings, brokers)
    wait_for_broker(settings)
    created = asyncio.run(ensure_topics(settings))
    asyncio.run(stamp_with_broker_time(settings))
    if scram_enabled(settings):
        asyncio.run(provision(settings))
    # The local worker's key, so that its results are credited to it.
    publish_sync(settings, [worker_registration(settings.home, settings.worker_id)])
    if uses_local_ledger(settings):
        start_ledger(settings)
    apply_ddl(get_client(settings))
    return created


def uses_local_ledger(settings: Settings) -> bool:
    """Whether the ledger is this stack's own ledger server (CLICKHOUSE_URL unset or its URL)."""
    return settings.clickhouse_url == settings.ledger_url


def stack_status(settings: Settings) -> StackStatus:
    """Each local node (or the external broker), the quorum's leader, the topics and the
    partitions short of in-sync replicas. Reports; does not fail."""
    settings = settings.acting_as(ADMIN)
    nodes = local_nodes(settings)
    states = [NodeStatus(node.node_id, node.address, running_pid(node.paths),
                         port_open(node.address)) for node in nodes]
    topics: list[str] = []
    under_replicated: list[str] = []
    controller: int | None = None
    if any(state.answers for state in states):
        try:
            topics = asyncio.run(_list_topics(settings))
            under_replicated = asyncio.run(under_replicated_partitions(settings))
        except Exception:  # noqa: BLE001 - status reports, it does not fail
            states = [NodeStatus(s.node_id, s.address, s.pid, False) for s in states]
        else:
            controller = quorum_leader(settings, nodes) if len(nodes) > 1 else 1
    return StackStatus(
        nodes=states,
        controller=controller,
        under_replicated=under_replicated,
        topics=topics,
        bootstrap=settings.kafka_bootstrap,
        security=settings.kafka_security,
        clickhouse_url=redact_url(settings.clickhouse_url),
        local_ledger=uses_local_ledger(settings),
        ledger_pid=ledger_pid(ledger_paths(settings)),
        ledger_answers=uses_local_ledger(settings) and ledger_answers(settings),
    )
