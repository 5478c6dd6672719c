"""A three-node cluster of its own for a test or benchmark: `loraledger stack up --brokers 3` on
free loopback ports, in a home of its own (its own credentials, data and ledger), always
stopped at the end. Never the shared single-node stack."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from infra.kafka.broker import broker_nodes, cluster_bootstrap, stop_broker
from infra.kafka.clients import make_admin
from infra.kafka.security import ADMIN
from infra.ledger_server.process import stop_ledger
from infra.settings import Settings, load_settings

REPO = Path(__file__).resolve().parents[2]
BROKERS = 3
START_DEADLINE_S = 240.0  # three JVMs on a loaded 2-core machine start slowly
# Client and controller ports of the three nodes, then the ledger server's.
PORTS = 2 * BROKERS + 1


def free_port_block(size: int = PORTS) -> int:
    """A base port with `size` free ports from it, away from the shared stack's."""
    for base in range(29100, 39000, 10):
        try:
            for port in range(base, base + size):
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise RuntimeError("no free block of ports")


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    """`loraledger ARGS` in `env`, its output captured."""
    return subprocess.run([sys.executable, "-m", "loraledger.cli", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=START_DEADLINE_S)


def cluster_environment(home: Path, clickhouse_url: str | None = None) -> dict[str, str]:
    """The environment of a stack in `home` on free ports. With no `clickhouse_url`, the ledger
    is the stack's own ledger server (on the block's last port)."""
    base = free_port_block()
    env = {**os.environ, "PYTHONPATH": str(REPO), "LORALEDGER_HOME": str(home),
           "KAFKA_BOOTSTRAP": f"127.0.0.1:{base}", "LORALEDGER_TOPIC_PREFIX": "",
           "LORALEDGER_LEDGER_PORT": str(base + PORTS - 1)}
    # Each process authenticates as its own principal with the credentials this stack writes
    # into its home; nothing of the shared stack's may leak in.
    for name in ("LORALEDGER_PRINCIPAL", "LORALEDGER_KAFKA_PASSWORD",
                 "LORALEDGER_CREDENTIALS_DIR", "CLICKHOUSE_URL"):
        env.pop(name, None)
    if clickhouse_url is not None:
        env["CLICKHOUSE_URL"] = clickhouse_url
    return env


@contextmanager
def three_node_cluster(
    home: Path, clickhouse_url: str | None = None
) -> Iterator[tuple[dict[str, str], Settings]]:
    """A three-node cluster up; yields the environment of a client that names every node, and
    the admin's settings. The brokers and the ledger server are stopped on exit."""
    env = cluster_environment(home, clickhouse_url)
    nodes = broker_nodes(load_settings(env), BROKERS)
    try:
        up = cli(env, "stack", "up", "--brokers", str(BROKERS))
        assert up.returncode == 0, up.stdout + up.stderr
        assert f"KAFKA_BOOTSTRAP={cluster_bootstrap(nodes)}" in up.stdout
        client = {**env, "KAFKA_BOOTSTRAP": cluster_bootstrap(nodes)}
        # The caller feeds and inspects the cluster as the admin, standing in for every producer.
        yield client, load_settings(client).as_principal(ADMIN)
    finally:
        stop_broker(load_settings(env))
        stop_ledger(load_settings(env))


async def leader_of(settings: Settings, topic: str, partition: int) -> int:
    """The node id leading one partition of a broker topic."""
    admin = make_admin(settings)
    await admin.start()
    try:
        [described] = await admin.describe_topics([topic])
    finally:
        await admin.close()
    return next(p["leader"] for p in described["partitions"] if p["partition"] == partition)
