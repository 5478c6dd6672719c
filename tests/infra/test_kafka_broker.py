"""The local broker's start-up refusals and configuration, without starting one."""

from __future__ import annotations

import pytest

from infra.kafka import broker as kafka_broker
from infra.kafka.broker import BrokerPaths, StackError, require_java, start_broker
from infra.settings import load_settings


def test_a_missing_java_is_refused_with_what_to_do(monkeypatch):
    monkeypatch.setattr(kafka_broker.shutil, "which", lambda name: None)
    with pytest.raises(StackError, match="Java 17") as info:
        require_java()
    assert "KAFKA_BOOTSTRAP" in str(info.value)


def test_a_missing_maven_is_refused_when_jars_are_not_cached(monkeypatch, tmp_path):
    settings = load_settings({"LORALEDGER_HOME": str(tmp_path), "LORALEDGER_CACHE": str(tmp_path)})
    monkeypatch.setattr(kafka_broker.shutil, "which", lambda name: None)
    with pytest.raises(StackError, match="Maven"):
        kafka_broker.fetch_jars(settings)


def test_a_port_taken_by_another_process_is_refused(monkeypatch, tmp_path):
    settings = load_settings({"LORALEDGER_HOME": str(tmp_path), "KAFKA_BOOTSTRAP": "127.0.0.1:1"})
    monkeypatch.setattr(kafka_broker, "port_open", lambda bootstrap: True)
    with pytest.raises(StackError, match="already listens"):
        start_broker(settings)


def test_the_config_follows_the_bootstrap_port(tmp_path):
    paths = BrokerPaths(tmp_path)
    kafka_broker._write_config(paths, "127.0.0.1:19092")
    config = paths.config.read_text()
    assert "listeners=PLAINTEXT://127.0.0.1:19092,CONTROLLER://127.0.0.1:19093" in config
    assert "advertised.listeners=PLAINTEXT://127.0.0.1:19092" in config
    assert f"log.dirs={paths.data}" in config
    assert "9092," not in config.replace("19092,", "")


def test_no_pid_file_means_not_running(tmp_path):
    assert kafka_broker.running_pid(BrokerPaths(tmp_path)) is None
    (tmp_path / "broker.pid").write_text("not a pid")
    assert kafka_broker.running_pid(BrokerPaths(tmp_path)) is None
