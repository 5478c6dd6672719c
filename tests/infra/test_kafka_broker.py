"""The local broker's start-up refusals and configuration, without starting one."""

from __future__ import annotations

import stat

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
from infra.kafka.security import ensure_credentials
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


def _settings(tmp_path, **env: str):
    settings = load_settings({"LORALEDGER_HOME": str(tmp_path),
                              "KAFKA_BOOTSTRAP": "127.0.0.1:19092", **env})
    ensure_credentials(settings)
    return settings


def _config(tmp_path, **env: str) -> str:
    settings = _settings(tmp_path, **env)
    [node] = broker_nodes(settings)
    assert node.paths == BrokerPaths(tmp_path / "kafka")
    node.paths.root.mkdir()
    kafka_broker._write_config(settings, node, [node])
    assert stat.S_IMODE(node.paths.config.stat().st_mode) == 0o600  # it holds the admin password
    config = node.paths.config.read_text()
    assert f"log.dirs={node.paths.data}" in config
    assert "controller.quorum.bootstrap.servers=127.0.0.1:19093" in config
    assert "9092," not in config.replace("19092,", "")
    assert _properties(config)["offsets.topic.replication.factor"] == "1"
    return config


def test_the_secured_config_authenticates_every_listener_and_denies_by_default(tmp_path):
    config = _config(tmp_path)
    assert "listeners=CLIENT://127.0.0.1:19092,CONTROLLER://127.0.0.1:19093" in config
    assert "advertised.listeners=CLIENT://127.0.0.1:19092" in config
    assert "CONTROLLER:SASL_PLAINTEXT,CLIENT:SASL_PLAINTEXT" in config
    assert "PLAINTEXT://" not in config
    assert "listener.name.client.sasl.enabled.mechanisms=SCRAM-SHA-512" in config
    assert "listener.name.controller.sasl.enabled.mechanisms=PLAIN" in config
    assert "StandardAuthorizer" in config
    assert "allow.everyone.if.no.acl.found=false" in config
    assert "super.users=User:admin\n" in config  # no ANONYMOUS super user
    password = load_settings({"LORALEDGER_HOME": str(tmp_path)}).credentials_dir
    assert (password / "admin" / "password").read_text() in config


def test_the_plaintext_config_only_when_chosen(tmp_path):
    config = _config(tmp_path, LORALEDGER_KAFKA_SECURITY="plaintext")
    assert "listeners=PLAINTEXT://127.0.0.1:19092,CONTROLLER://127.0.0.1:19093" in config
    assert "advertised.listeners=PLAINTEXT://127.0.0.1:19092" in config
    assert "sasl" not in config and "authorizer" not in config


def test_the_local_broker_refuses_tls_it_cannot_serve(monkeypatch, tmp_path):
    settings = load_settings({"LORALEDGER_HOME": str(tmp_path), "KAFKA_BOOTSTRAP": "127.0.0.1:1",
                              "LORALEDGER_KAFKA_SECURITY": "scram-tls"})
    monkeypatch.setattr(kafka_broker, "port_open", lambda bootstrap: False)
    with pytest.raises(StackError, match="LORALEDGER_KAFKA_SECURITY=scram"):
        start_broker(settings)


def test_a_cluster_has_a_node_per_port_pair_each_voting_and_replicating_three_times(tmp_path):
    settings = _settings(tmp_path)
    nodes = broker_nodes(settings, 3)
    assert [(n.node_id, n.port, n.controller_port) for n in nodes] == [
        (1, 19092, 19093), (2, 19094, 19095), (3, 19096, 19097)]
    assert [n.paths.root for n in nodes] == [tmp_path / "kafka" / f"node-{i}" for i in (1, 2, 3)]
    assert cluster_bootstrap(nodes) == "127.0.0.1:19092,127.0.0.1:19094,127.0.0.1:19096"
    for node in nodes:
        node.paths.root.mkdir(parents=True)
        kafka_broker._write_config(settings, node, nodes)
    assert [n.node_id for n in local_nodes(settings)] == [1, 2, 3]
    second = _properties(nodes[1].paths.config.read_text())
    assert second["node.id"] == "2"
    assert second["listeners"] == "CLIENT://127.0.0.1:19094,CONTROLLER://127.0.0.1:19095"
    assert second["advertised.listeners"] == "CLIENT://127.0.0.1:19094"
    # Every node's controller listener is secured, and the nodes talk as the admin.
    assert second["listener.security.protocol.map"] == (
        "CONTROLLER:SASL_PLAINTEXT,CLIENT:SASL_PLAINTEXT")
    assert second["listener.name.controller.sasl.enabled.mechanisms"] == "PLAIN"
    assert second["sasl.mechanism.controller.protocol"] == "PLAIN"
    assert second["allow.everyone.if.no.acl.found"] == "false"
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
