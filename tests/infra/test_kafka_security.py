"""Principals and their credentials, without a broker: password files, the client options each
principal gets, and plaintext only when asked for."""

from __future__ import annotations

import ssl
import stat

import pytest

from infra.kafka.security import (
    PRINCIPALS,
    CredentialsError,
    ensure_credentials,
    faust_credentials,
    kafka_client_options,
    password_file,
    password_for,
)
from infra.settings import load_settings, redact_url
from infra.stack import stack_status


@pytest.fixture
def settings(tmp_path):
    return load_settings({"LORALEDGER_HOME": str(tmp_path)})


def test_every_principal_gets_a_password_file_readable_by_its_owner_alone(settings):
    assert sorted(ensure_credentials(settings)) == sorted(PRINCIPALS)
    passwords = set()
    for principal in PRINCIPALS:
        path = password_file(settings, principal)
        assert path.parent.parent == settings.home / "credentials"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        passwords.add(password_for(settings, principal))
    assert stat.S_IMODE(settings.credentials_dir.stat().st_mode) == 0o700
    assert len(passwords) == len(PRINCIPALS)
    assert all(len(password) >= 32 for password in passwords)


def test_provisioning_twice_keeps_the_passwords(settings):
    ensure_credentials(settings)
    before = {principal: password_for(settings, principal) for principal in PRINCIPALS}
    assert ensure_credentials(settings) == []
    assert before == {principal: password_for(settings, principal) for principal in PRINCIPALS}


def test_a_password_file_others_can_read_is_refused(settings):
    ensure_credentials(settings)
    password_file(settings, "worker").chmod(0o644)
    with pytest.raises(CredentialsError, match="chmod 600"):
        password_for(settings, "worker")


def test_a_missing_password_says_how_to_create_it(settings):
    with pytest.raises(CredentialsError, match="stack up"):
        kafka_client_options(settings.as_principal("worker"))


def test_secure_is_the_default_and_each_command_picks_its_principal(settings):
    ensure_credentials(settings)
    assert settings.kafka_security == "scram"
    options = kafka_client_options(settings)
    assert options["security_protocol"] == "SASL_PLAINTEXT"
    assert options["sasl_mechanism"] == "SCRAM-SHA-512"
    assert options["sasl_plain_username"] == "client"  # no command chose one
    worker = kafka_client_options(settings.acting_as("worker"))
    assert worker["sasl_plain_username"] == "worker"
    assert worker["sasl_plain_password"] == password_for(settings, "worker")


def test_the_environment_principal_overrides_the_commands_own(tmp_path):
    settings = load_settings({"LORALEDGER_HOME": str(tmp_path), "LORALEDGER_PRINCIPAL": "sink"})
    ensure_credentials(settings)
    assert kafka_client_options(settings.acting_as("worker"))["sasl_plain_username"] == "sink"


def test_an_unknown_principal_is_refused(tmp_path):
    settings = load_settings({"LORALEDGER_HOME": str(tmp_path), "LORALEDGER_PRINCIPAL": "root"})
    with pytest.raises(CredentialsError, match="unknown Kafka principal"):
        kafka_client_options(settings)


def test_plaintext_only_when_chosen_explicitly(tmp_path):
    plaintext = load_settings(
        {"LORALEDGER_HOME": str(tmp_path), "LORALEDGER_KAFKA_SECURITY": "plaintext"}
    )
    assert kafka_client_options(plaintext) == {"security_protocol": "PLAINTEXT"}
    assert faust_credentials(plaintext) is None
    with pytest.raises(ValueError, match="LORALEDGER_KAFKA_SECURITY"):
        load_settings({"LORALEDGER_KAFKA_SECURITY": "none"})


def test_scram_over_tls_for_a_remote_broker(tmp_path):
    settings = load_settings(
        {"LORALEDGER_HOME": str(tmp_path), "LORALEDGER_KAFKA_SECURITY": "scram-tls"}
    )
    ensure_credentials(settings)
    options = kafka_client_options(settings)
    assert options["security_protocol"] == "SASL_SSL"
    assert isinstance(options["ssl_context"], ssl.SSLContext)
    credentials = faust_credentials(settings.as_principal("governance"))
    assert (credentials.username, credentials.protocol.value) == ("governance", "SASL_SSL")


def test_a_password_from_the_environment_needs_its_principal_and_is_never_printed(tmp_path):
    with pytest.raises(ValueError, match="LORALEDGER_PRINCIPAL"):
        load_settings({"LORALEDGER_KAFKA_PASSWORD": "s3cret-value"})
    settings = load_settings({"LORALEDGER_HOME": str(tmp_path), "LORALEDGER_PRINCIPAL": "admin",
                              "LORALEDGER_KAFKA_PASSWORD": "s3cret-value"})
    assert kafka_client_options(settings)["sasl_plain_password"] == "s3cret-value"
    assert "s3cret-value" not in repr(settings)
    # The others still get files; the admin's password stays in the environment.
    assert "admin" not in ensure_credentials(settings)
    assert not password_file(settings, "admin").exists()


def test_urls_are_printed_without_their_password():
    assert redact_url("http://ledger:hunter2@clickhouse:8123") == "http://ledger:***@clickhouse:8123"
    assert redact_url("https://clickhouse:8443/db") == "https://clickhouse:8443/db"
    assert redact_url("chdb:///srv/ll/clickhouse") == "chdb:///srv/ll/clickhouse"


def test_stack_status_redacts_the_clickhouse_password(tmp_path):
    state = stack_status(load_settings({
        "LORALEDGER_HOME": str(tmp_path),
        "KAFKA_BOOTSTRAP": "127.0.0.1:1",  # nothing answers: status still reports
        "CLICKHOUSE_URL": "http://ledger:hunter2@clickhouse:8123",
    }))
    assert not state.answers
    assert "hunter2" not in state.clickhouse_url
    assert state.clickhouse_url == "http://ledger:***@clickhouse:8123"
