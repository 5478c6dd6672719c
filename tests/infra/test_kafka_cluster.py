"""`loraledger stack up --brokers 3` on ports of its own, with a home of its own: topics are
replicated three times with two in sync required, producers with acks=all keep writing while a
node is SIGKILLed, and the node comes back and catches up. The cluster is always stopped."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator

import pytest
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from kafka_cluster import START_DEADLINE_S, cli, leader_of, three_node_cluster

from infra.kafka.broker import broker_nodes, running_pid
from infra.kafka.clients import ensure_topics, make_admin
from infra.kafka.events import publish, read_topic
from infra.settings import Settings
from infra.stack import stack_status
from schemas.events import InferenceRequest
from schemas.topics import topic_name

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def cluster(tmp_path) -> Iterator[tuple[dict[str, str], Settings]]:
    """A three-node cluster up, and the environment of a client that names every node."""
    with three_node_cluster(tmp_path / "home", f"chdb://{tmp_path / 'clickhouse'}") as running:
        yield running


async def replication_of(settings: Settings, topic: str) -> tuple[set[int], str]:
    """The replica counts of a topic's partitions and its min.insync.replicas."""
    admin = make_admin(settings)
    await admin.start()
    try:
        [described] = await admin.describe_topics([topic])
        [configs] = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, topic, {"min.insync.replicas": None})])
    finally:
        await admin.close()
    entries = configs.to_object()["resources"][0]["config_entries"]
    min_isr = next(e["config_value"] for e in entries if e["config_names"] == "min.insync.replicas")
    return {len(p["replicas"]) for p in described["partitions"]}, min_isr


def requests(first: int, count: int) -> list[InferenceRequest]:
    return [InferenceRequest(request_id=f"req-{i:04d}", adapter_id=f"adapter-{i % 5}",
                             prompt=f"question {i}") for i in range(first, first + count)]


async def read_ids(settings: Settings) -> list[str]:
    return [item.event.request_id
            async for item in read_topic(settings, "requests", idle_timeout_s=3.0)]


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + START_DEADLINE_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(1.0)


def test_a_three_node_cluster_survives_a_killed_node_and_takes_it_back(cluster):
    env, settings = cluster
    topic = topic_name("requests")
    assert asyncio.run(replication_of(settings, topic)) == ({3}, "2")
    asyncio.run(ensure_topics(settings))  # idempotent on a cluster too

    # Secured like one node: every node's client and controller listeners authenticate.
    for node in broker_nodes(settings, 3):
        config = node.paths.config.read_text()
        assert "CONTROLLER:SASL_PLAINTEXT,CLIENT:SASL_PLAINTEXT" in config
        assert "allow.everyone.if.no.acl.found=false" in config
    status = stack_status(settings)
    assert status.security == "scram"
    assert [(n.node_id, n.answers) for n in status.nodes] == [(1, True), (2, True), (3, True)]
    assert status.controller in {1, 2, 3}
    assert status.under_replicated == []

    asyncio.run(publish(settings, requests(0, 50)))
    assert sorted(asyncio.run(read_ids(settings))) == [r.request_id for r in requests(0, 50)]

    # SIGKILL the leader of a partition written to: acks=all still succeeds with two in sync.
    victim = asyncio.run(leader_of(settings, topic, 0))
    victim_node = broker_nodes(settings, 3)[victim - 1]
    pid = running_pid(victim_node.paths)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: running_pid(victim_node.paths) is None, "the node to die")
    asyncio.run(publish(settings, requests(50, 50)))
    assert sorted(asyncio.run(read_ids(settings))) == [r.request_id for r in requests(0, 100)]
    down = stack_status(settings)
    assert [n.node_id for n in down.nodes if not n.answers] == [victim]
    assert down.under_replicated, "with a node down, its partitions lack a replica"

    # `stack up` again starts only the missing node, which catches up.
    again = cli(env, "stack", "up", "--brokers", "3")
    assert again.returncode == 0, again.stdout + again.stderr
    wait_for(lambda: stack_status(settings).under_replicated == [], "the node to catch up")
    shown = cli(env, "stack", "status")
    assert shown.returncode == 0, shown.stdout + shown.stderr
    for node in broker_nodes(settings, 3):
        assert f"broker {node.node_id} {node.address}: pid" in shown.stdout
    assert "does not answer" not in shown.stdout
    assert "under-replicated: none" in shown.stdout
    asyncio.run(publish(settings, requests(100, 10)))
    assert sorted(asyncio.run(read_ids(settings))) == [r.request_id for r in requests(0, 110)]
