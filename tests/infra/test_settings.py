from __future__ import annotations

import dataclasses

import pytest

from infra.settings import ENV_VARS, load_settings

SAMPLE_VALUES = {
    "LORALEDGER_HOME": "/srv/ll",
    "KAFKA_BOOTSTRAP": "kafka:29092",
    "LORALEDGER_TOPIC_PREFIX": "stack2.",
    "CLICKHOUSE_URL": "http://clickhouse:8123",
    "LORALEDGER_DEVICE": "cuda",
    "LORALEDGER_WORKER_ID": "gpu-7",
    "LORALEDGER_BASE_MODEL": "/models/llama",
    "LORALEDGER_METRICS_PORT": "9400",
    "LORALEDGER_CACHE": "/var/cache/ll",
    "LORALEDGER_EPOCH_SECONDS": "60",
    "LORALEDGER_LEDGER_PORT": "18123",
    "LORALEDGER_LEDGER_PASSWORD": "s3cret",
    "LORALEDGER_GATEWAY_PORT": "8080",
    "LORALEDGER_GATEWAY_TIMEOUT_S": "2.5",
    "LORALEDGER_GATEWAY_MAX_IN_FLIGHT": "16",
    "LORALEDGER_KAFKA_SECURITY": "scram-tls",
    "LORALEDGER_PRINCIPAL": "worker",
    "LORALEDGER_CREDENTIALS_DIR": "/run/secrets/loraledger",
    "LORALEDGER_KAFKA_PASSWORD": "from-a-secret-store",
}
# A variable that is read only together with another.
REQUIRES = {"LORALEDGER_KAFKA_PASSWORD": {"LORALEDGER_PRINCIPAL": "worker"}}


def test_every_documented_variable_changes_a_setting():
    assert set(SAMPLE_VALUES) == set(ENV_VARS)
    for name, value in SAMPLE_VALUES.items():
        base = REQUIRES.get(name, {})
        defaults = dataclasses.asdict(load_settings(base))
        changed = dataclasses.asdict(load_settings({**base, name: value}))
        assert changed != defaults, f"{name} is documented but not read"


def test_defaults_point_at_the_local_stack():
    settings = load_settings({"LORALEDGER_HOME": "/srv/ll"})
    assert settings.kafka_bootstrap == "127.0.0.1:9092"
    assert settings.clickhouse_url == settings.ledger_url == "http://127.0.0.1:8123"
    assert settings.ledger_dir.as_posix() == "/srv/ll/clickhouse"
    assert settings.adapters_dir.as_posix() == "/srv/ll/adapters"


def test_the_ledger_port_moves_the_default_url_but_not_an_explicit_one():
    assert load_settings({"LORALEDGER_LEDGER_PORT": "18123"}).clickhouse_url == (
        "http://127.0.0.1:18123"
    )
    explicit = load_settings({"LORALEDGER_LEDGER_PORT": "18123", "CLICKHOUSE_URL": "chdb:///d"})
    assert explicit.clickhouse_url == "chdb:///d"
    with pytest.raises(ValueError, match="LORALEDGER_LEDGER_PORT"):
        load_settings({"LORALEDGER_LEDGER_PORT": "70000"})


@pytest.mark.parametrize("value", ["0", "-5", "soon"])
def test_bad_epoch_length_is_refused(value):
    with pytest.raises(ValueError, match="LORALEDGER_EPOCH_SECONDS"):
        load_settings({"LORALEDGER_EPOCH_SECONDS": value})
