"""The stack an integration test runs against: the broker `loraledger stack up` started (its
address and credentials from the environment), with a fresh topic prefix per test.

The broker is secured unless LORALEDGER_KAFKA_SECURITY=plaintext: a test's prefix gets the
stack's ACLs, provisioned with the admin credentials `stack up` wrote. The processes a test
starts (worker, pipeline, CLI commands) authenticate as their own principals, so the ACLs are
part of what is tested; the test itself feeds and reads topics as the admin, standing in for
every producer."""

from __future__ import annotations

import asyncio
import os
import uuid
from pathlib import Path

import pytest

from infra.kafka.broker import port_open
from infra.kafka.clients import ensure_topics
from infra.kafka.provisioning import provision_acls
from infra.kafka.security import ADMIN, scram_enabled
from infra.settings import Settings, load_settings


def stack_environment(clickhouse_dir: Path) -> dict[str, str]:
    """The process environment with a fresh topic prefix and its own ClickHouse directory."""
    env = dict(os.environ)
    env["LORALEDGER_TOPIC_PREFIX"] = f"t{uuid.uuid4().hex[:10]}."
    env["CLICKHOUSE_URL"] = f"chdb://{clickhouse_dir}"
    env.setdefault("KAFKA_BOOTSTRAP", "127.0.0.1:9092")
    # Each process picks its own principal; the stack's credentials stay where they are when
    # a test moves a process's home.
    env.pop("LORALEDGER_PRINCIPAL", None)
    env.pop("LORALEDGER_KAFKA_PASSWORD", None)
    env["LORALEDGER_CREDENTIALS_DIR"] = str(load_settings(env).credentials_dir)
    return env


def provisioned_settings(env: dict[str, str]) -> Settings:
    """Settings for `env`, as the admin, with the registry's topics and their ACLs created
    under its prefix."""
    settings = load_settings(env).as_principal(ADMIN)
    if not port_open(settings.kafka_bootstrap):
        pytest.fail(
            f"no Kafka broker at {settings.kafka_bootstrap}: run `loraledger stack up` "
            "(make test does) before the integration tests"
        )
    asyncio.run(ensure_topics(settings))
    if scram_enabled(settings):
        asyncio.run(provision_acls(settings))
    return settings
