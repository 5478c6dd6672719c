"""The local broker's start-up refusals and configuration, without starting one."""

from __future__ import annotations

import pytest

from infra.kafka import broker as kafka_broker
from infra.kafka.broker import (
    BrokerPaths,
    StackError,
    broker_nodes,
    cluster_bootstrap,
    local_nodes,
    require_java,
    start_broker,
)
from infra.kafka.clients import Replication
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


def _properties(text: str) -> dict[str, str]:
    """As Java reads a properties file: the last value of a key wins."""
    pairs = (line.split("=", 1) for line in text.splitlines()
             if "=" in line and not line.startswith("#"))
    return dict(pairs)


def test_the_config_follows_the_bootstrap_port(tmp_path):
    settings = load_settings({"LORALEDGER_HOME": str(tmp_path),
                              "KAFKA_BOOTSTRAP": "127.0.0.1:19092"})
    [node] = broker_nodes(settings)
    assert node.paths == BrokerPaths(tmp_path / "kafka")
    node.paths.root.mkdir(parents=True)
    kafka_broker._write_config(node, [node])
    config = node.paths.config.read_text()
    assert "listeners=PLAINTEXT://127.0.0.1:19092,CONTROLLER://127.0.0.1:19093" in config
    assert "advertised.listeners=PLAINTEXT://127.0.0.1:19092" in config
    assert f"log.dirs={node.paths.data}" in config
    assert "9092," not in config.replace("19092,", "")
    assert _properties(config)["offsets.topic.replication.factor"] == "1"


def test_a_cluster_has_a_node_per_port_pair_each_voting_and_replicating_three_times(tmp_path):
    settings = load_settings({"LORALEDGER_HOME": str(tmp_path),
                              "KAFKA_BOOTSTRAP": "127.0.0.1:19092"})
    nodes = broker_nodes(settings, 3)
    assert [(n.node_id, n.port, n.controller_port) for n in nodes] == [
        (1, 19092, 19093), (2, 19094, 19095), (3, 19096, 19097)]
    assert [n.paths.root for n in nodes] == [tmp_path / "kafka" / f"node-{i}" for i in (1, 2, 3)]
    assert cluster_bootstrap(nodes) == "127.0.0.1:19092,127.0.0.1:19094,127.0.0.1:19096"
    for node in nodes:
        node.paths.root.mkdir(parents=True)
        kafka_broker._write_config(node, nodes)
    assert [n.node_id for n in local_nodes(settings)] == [1, 2, 3]
    second = _properties(nodes[1].paths.config.read_text())
    assert second["node.id"] == "2"
    assert second["listeners"] == "PLAINTEXT://127.0.0.1:19094,CONTROLLER://127.0.0.1:19095"
    assert second["advertised.listeners"] == "PLAINTEXT://127.0.0.1:19094"
    assert second["controller.quorum.bootstrap.servers"] == (
        "127.0.0.1:19093,127.0.0.1:19095,127.0.0.1:19097")
    assert second["log.dirs"] == str(nodes[1].paths.data)
    for key in ("offsets.topic.replication.factor", "transaction.state.log.replication.factor",
                "default.replication.factor"):
        assert second[key] == "3", key
    assert second["min.insync.replicas"] == second["transaction.state.log.min.isr"] == "2"


def test_replication_follows_the_cluster_size():
    assert Replication.for_brokers(1) == Replication(1, 1)
    assert Replication.for_brokers(1).topic_config() == {}
    assert Replication.for_brokers(3) == Replication(3, 2)
    assert Replication.for_brokers(3).topic_config() == {"min.insync.replicas": "2"}
    assert Replication.for_brokers(5) == Replication(3, 2)


def test_no_pid_file_means_not_running(tmp_path):
    assert kafka_broker.running_pid(BrokerPaths(tmp_path)) is None
    (tmp_path / "broker.pid").write_text("not a pid")
    assert kafka_broker.running_pid(BrokerPaths(tmp_path)) is None
