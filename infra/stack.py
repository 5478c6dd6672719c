"""`loraledger stack up | down | status`: the local stack, with no Docker.

Kafka runs as one KRaft node from jars fetched with Maven; the ledger is the local ledger server
(ClickHouse's HTTP interface over the embedded engine) unless CLICKHOUSE_URL names another
server or a chdb:// directory, so `up` only has to start the broker and the ledger server,
create the topics from the registry, provision the principals (password files, SCRAM
credentials, ACLs) and apply the ClickHouse DDL. Every step is idempotent, and all but
starting the broker also work on a broker started elsewhere (`--external`), given its
admin's password.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from infra.kafka.broker import StackError, broker_paths, port_open, running_pid, start_broker
from infra.kafka.clients import ensure_topics, make_admin
from infra.kafka.provisioning import provision
from infra.kafka.security import ADMIN, ensure_credentials, scram_enabled
from infra.ledger_server.process import ledger_answers, ledger_paths, start_ledger
from infra.ledger_server.process import running_pid as ledger_pid
from infra.settings import Settings, redact_url


@dataclass(frozen=True)
class StackStatus:
    broker_pid: int | None
    broker_answers: bool
    topics: list[str]
    bootstrap: str
    security: str
    clickhouse_url: str  # its password redacted
    local_ledger: bool  # CLICKHOUSE_URL is this stack's ledger server, so `up` starts it
    ledger_pid: int | None
    ledger_answers: bool


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


def stack_up(settings: Settings, *, start_local_broker: bool = True) -> list[str]:
    """Start what the local stack needs and return the topics created. Runs as the admin
    principal unless LORALEDGER_PRINCIPAL says otherwise."""
    from infra.clickhouse_client import apply_ddl, get_client

    settings = settings.acting_as(ADMIN)
    if scram_enabled(settings):
        ensure_credentials(settings)
    if start_local_broker:
        start_broker(settings)
    wait_for_broker(settings)
    created = asyncio.run(ensure_topics(settings))
    if scram_enabled(settings):
        asyncio.run(provision(settings))
    if uses_local_ledger(settings):
        start_ledger(settings)
    apply_ddl(get_client(settings))
    return created


def uses_local_ledger(settings: Settings) -> bool:
    """Whether the ledger is this stack's own ledger server (CLICKHOUSE_URL unset or its URL)."""
    return settings.clickhouse_url == settings.ledger_url


def stack_status(settings: Settings) -> StackStatus:
    settings = settings.acting_as(ADMIN)
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
        security=settings.kafka_security,
        clickhouse_url=redact_url(settings.clickhouse_url),
        local_ledger=uses_local_ledger(settings),
        ledger_pid=ledger_pid(ledger_paths(settings)),
        ledger_answers=uses_local_ledger(settings) and ledger_answers(settings),
    )
