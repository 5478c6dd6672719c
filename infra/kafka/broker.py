"""The local Apache Kafka brokers (KRaft) run from jars fetched from Maven Central: one node by
default, or a cluster of combined broker+controller nodes on loopback.

The jars are fetched once with Maven into the shared cache (outside any checkout) and reused;
the brokers' data and logs live under the stack's home: `kafka/` for the single node,
`kafka/node-N/` for node N of a cluster. Node N of a cluster serves clients on the bootstrap
port + 2(N-1) and its controller on the port after that (9092/9093, 9094/9095, 9096/9097 by
default); every node is formatted with the same cluster id and the same initial controllers.

Secured (the default), clients authenticate with SASL/SCRAM-SHA-512 on the client listener and
the StandardAuthorizer allows only what an ACL allows (`infra.kafka.acls`); the admin principal
is the one super user, and the nodes of a cluster talk to each other as the admin. The admin's
SCRAM credential is written at storage-format time; every node's controller listener accepts
only the admin too (SASL/PLAIN against the node's own config), so no anonymous connection on
any port has any right. A node's config holds the admin password and is readable by its owner
alone.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from infra.kafka.clients import Replication
from infra.kafka.security import ADMIN, CredentialsError, password_for, scram_enabled
from infra.settings import Settings

KAFKA_VERSION = "4.1.1"
_KAFKA_SRC = Path(__file__).resolve().parent


class StackError(RuntimeError):
    """A local-stack operation that cannot proceed; the message says what to do."""


@dataclass(frozen=True)
class BrokerPaths:
    root: Path

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def config(self) -> Path:
        return self.root / "server.properties"

    @property
    def pid_file(self) -> Path:
        return self.root / "broker.pid"

    @property
    def admin_marker(self) -> Path:
        """Present once the storage holds the admin's SCRAM credential."""
        return self.root / "admin-credential"


@dataclass(frozen=True)
class BrokerNode:
    node_id: int
    host: str
    port: int  # clients
    controller_port: int
    paths: BrokerPaths

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def controller_address(self) -> str:
        return f"{self.host}:{self.controller_port}"


def broker_paths(settings: Settings) -> BrokerPaths:
    """The single node's directory."""
    return BrokerPaths(settings.kafka_dir)


def broker_nodes(settings: Settings, brokers: int = 1) -> list[BrokerNode]:
    """The nodes of a local stack of `brokers` nodes, from KAFKA_BOOTSTRAP's first address."""
    if brokers < 1:
        raise StackError(f"--brokers {brokers}: a stack needs at least one broker")
    host, port = host_port(settings.kafka_bootstrap)
    if brokers == 1:
        return [BrokerNode(1, host, port, port + 1, broker_paths(settings))]
    return [
        BrokerNode(n, host, port + 2 * (n - 1), port + 2 * (n - 1) + 1,
                   BrokerPaths(settings.kafka_dir / f"node-{n}"))
        for n in range(1, brokers + 1)
    ]


def local_nodes(settings: Settings) -> list[BrokerNode]:
    """The nodes this home holds: a cluster's when `stack up --brokers N` made one."""
    clustered = list(settings.kafka_dir.glob("node-*/server.properties"))
    return broker_nodes(settings, len(clustered) or 1)


def cluster_bootstrap(nodes: list[BrokerNode]) -> str:
    """The KAFKA_BOOTSTRAP value naming every node, so clients reach a cluster that has lost one."""
    return ",".join(node.address for node in nodes)


def jars_dir(settings: Settings) -> Path:
    """Keyed by the pom's hash, so a change to the dependency list fetches afresh."""
    pom_hash = hashlib.sha256((_KAFKA_SRC / "pom.xml").read_bytes()).hexdigest()[:12]
    return settings.cache_dir / f"kafka-{KAFKA_VERSION}-{pom_hash}" / "libs"


def require_java() -> str:
    java = shutil.which("java")
    if java is None:
        raise StackError(
            "Java is not installed: the local Kafka broker needs Java 17 or newer "
            "(e.g. `apt-get install openjdk-17-jre-headless`), or point KAFKA_BOOTSTRAP at a broker"
        )
    return java


def fetch_jars(settings: Settings) -> Path:
    """Download the broker's jars with Maven, once; later calls reuse the cache."""
    target = jars_dir(settings)
    if target.is_dir() and any(target.glob("kafka_2.13-*.jar")):
        return target
    mvn = shutil.which("mvn")
    if mvn is None:
        raise StackError(
            "Maven is not installed: it fetches the Kafka broker's jars once "
            "(e.g. `apt-get install maven`)"
        )
    partial = target.with_name("libs.partial")
    shutil.rmtree(partial, ignore_errors=True)
    command = [
        mvn, "-q", "-B", "-f", str(_KAFKA_SRC / "pom.xml"), "package",
        f"-Dkafka.version={KAFKA_VERSION}", f"-Dkafka.libs={partial}",
    ]
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode != 0:
        tail = (completed.stdout + completed.stderr).strip().splitlines()[-5:]
        raise StackError("fetching the Kafka jars with Maven failed: " + " | ".join(tail))
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    return target


def host_port(bootstrap: str) -> tuple[str, int]:
    first = bootstrap.split(",")[0].strip()
    host, _, port = first.rpartition(":")
    return host or "127.0.0.1", int(port or 9092)


def port_open(bootstrap: str, timeout: float = 0.5) -> bool:
    host, port = host_port(bootstrap)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _listeners(settings: Settings, node: BrokerNode, nodes: list[BrokerNode]) -> str:
    client, controller = node.address, node.controller_address
    common = "controller.quorum.bootstrap.servers={}\n".format(
        ",".join(n.controller_address for n in nodes)
    )
    if not scram_enabled(settings):
        return common + (
            f"listeners=PLAINTEXT://{client},CONTROLLER://{controller}\n"
            f"advertised.listeners=PLAINTEXT://{client}\n"
            "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT\n"
            "inter.broker.listener.name=PLAINTEXT\n"
        )
    password = password_for(settings, ADMIN)
    return common + (
        f"listeners=CLIENT://{client},CONTROLLER://{controller}\n"
        f"advertised.listeners=CLIENT://{client}\n"
        "listener.security.protocol.map=CONTROLLER:SASL_PLAINTEXT,CLIENT:SASL_PLAINTEXT\n"
        "inter.broker.listener.name=CLIENT\n"
        "sasl.mechanism.inter.broker.protocol=SCRAM-SHA-512\n"
        "listener.name.client.sasl.enabled.mechanisms=SCRAM-SHA-512\n"
        "listener.name.client.scram-sha-512.sasl.jaas.config="
        "org.apache.kafka.common.security.scram.ScramLoginModule required "
        f'username="{ADMIN}" password="{password}";\n'
        "sasl.mechanism.controller.protocol=PLAIN\n"
        "listener.name.controller.sasl.enabled.mechanisms=PLAIN\n"
        "listener.name.controller.plain.sasl.jaas.config="
        "org.apache.kafka.common.security.plain.PlainLoginModule required "
        f'username="{ADMIN}" password="{password}" user_{ADMIN}="{password}";\n'
        "authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer\n"
        "allow.everyone.if.no.acl.found=false\n"
        f"super.users=User:{ADMIN}\n"
    )


def _write_config(settings: Settings, node: BrokerNode, nodes: list[BrokerNode]) -> None:
    template = (_KAFKA_SRC / "server.properties").read_text()
    config = (template + _listeners(settings, node, nodes) + f"log.dirs={node.paths.data}\n"
              + _cluster_overrides(node, nodes))
    node.paths.config.unlink(missing_ok=True)
    descriptor = os.open(node.paths.config, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as out:
        out.write(config)


def _cluster_overrides(node: BrokerNode, nodes: list[BrokerNode]) -> str:
    """A cluster node's differences from the single-node template (a later key wins)."""
    if len(nodes) == 1:
        return ""
    replication = Replication.for_brokers(len(nodes))
    replicas, min_isr = replication.replicas, replication.min_in_sync
    settings = {
        "node.id": node.node_id,
        "default.replication.factor": replicas,
        "min.insync.replicas": min_isr,
        "offsets.topic.replication.factor": replicas,
        "transaction.state.log.replication.factor": replicas,
        "transaction.state.log.min.isr": min_isr,
        "share.coordinator.state.topic.replication.factor": replicas,
        "share.coordinator.state.topic.min.isr": min_isr,
    }
    lines = [f"{key}={value}" for key, value in settings.items()]
    return "# cluster of {}\n{}\n".format(len(nodes), "\n".join(lines))


def _java_command(settings: Settings, paths: BrokerPaths, main: str, *args: str) -> list[str]:
    return [
        require_java(),
        "-Xms256m",
        "-Xmx768m",
        f"-Dkafka.logs.dir={paths.logs}",
        f"-Dlog4j2.configurationFile={_KAFKA_SRC / 'log4j2.properties'}",
        "-cp",
        f"{jars_dir(settings)}/*",
        main,
        *args,
    ]


def _meta(paths: BrokerPaths) -> dict[str, str]:
    try:
        text = (paths.data / "meta.properties").read_text()
    except FileNotFoundError:
        return {}
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def _kafka_uuid() -> str:
    """A Kafka Uuid: 16 random bytes, base64url without padding (Kafka's own never starts with
    '-', which a command line would take for an option)."""
    while True:
        encoded = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode("ascii").rstrip("=")
        if not encoded.startswith("-"):
            return encoded


def _format_storage(settings: Settings, nodes: list[BrokerNode]) -> None:
    """Format the nodes not formatted yet, all with one cluster id (an existing node's, if
    any) and, for a cluster, the same initial controllers: every node."""
    formatted = [meta for node in nodes if (meta := _meta(node.paths))]
    if len(formatted) == len(nodes):
        return
    cluster_id = formatted[0]["cluster.id"] if formatted else _kafka_uuid()
    directory_ids = {node.node_id: _meta(node.paths).get("directory.id") or _kafka_uuid()
                     for node in nodes}
    voters = ",".join(f"{node.node_id}@{node.controller_address}:{directory_ids[node.node_id]}"
                      for node in nodes)
    scram = []
    if scram_enabled(settings):
        scram = ["--add-scram",
                 f"SCRAM-SHA-512=[name={ADMIN},password={password_for(settings, ADMIN)}]"]
    for node in nodes:
        if _meta(node.paths):
            continue
        quorum = ["--standalone"] if len(nodes) == 1 else ["--initial-controllers", voters]
        command = _java_command(
            settings, node.paths, "kafka.tools.StorageTool",
            "format", "-t", cluster_id, "-c", str(node.paths.config), *quorum, *scram,
        )
        completed = subprocess.run(command, capture_output=True, text=True)
        if completed.returncode != 0:
            raise StackError(
                f"formatting node {node.node_id}'s storage failed: {completed.stderr.strip()}"
            )
        if scram:
            node.paths.admin_marker.touch()


def quorum_leader(settings: Settings, nodes: list[BrokerNode]) -> int | None:
    """The node id leading the KRaft quorum (the active controller), asked with Kafka's own
    metadata-quorum tool; None when it cannot say."""
    if not any(jars_dir(settings).glob("kafka-tools-*.jar")):
        return None
    command = _java_command(
        settings, nodes[0].paths, "org.apache.kafka.tools.MetadataQuorumCommand",
        "--bootstrap-server", cluster_bootstrap(nodes),
        *_admin_tool_config(settings, nodes[0].paths), "describe", "--status",
    )
    try:
        completed = subprocess.run(command, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return None
    for line in completed.stdout.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "LeaderId" and value.strip().isdigit():
            return int(value.strip())
    return None


def _admin_tool_config(settings: Settings, paths: BrokerPaths) -> list[str]:
    """`--command-config` for a Kafka tool that connects as the admin (none on plaintext)."""
    if not scram_enabled(settings):
        return []
    config = paths.root / "admin-client.properties"
    config.unlink(missing_ok=True)
    descriptor = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as out:
        out.write(
            "security.protocol=SASL_PLAINTEXT\n"
            "sasl.mechanism=SCRAM-SHA-512\n"
            "sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule "
            f'required username="{ADMIN}" password="{password_for(settings, ADMIN)}";\n'
        )
    return ["--command-config", str(config)]


def running_pid(paths: BrokerPaths) -> int | None:
    try:
        pid = int(paths.pid_file.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    return pid


def start_broker(settings: Settings, brokers: int = 1, timeout_s: float = 90.0) -> list[int]:
    """Start the stack's `brokers` nodes (those not already running) and wait until each one's
    port answers; returns their pids."""
    nodes = broker_nodes(settings, brokers)
    for node in nodes:
        if running_pid(node.paths) is None and port_open(node.address):
            raise StackError(
                f"something else already listens on {node.address}: stop it, or set "
                "KAFKA_BOOTSTRAP to use that broker without `stack up`"
            )
    if settings.kafka_security == "scram-tls":
        raise StackError(
            "the local broker listens on the loopback interface without TLS: use "
            "LORALEDGER_KAFKA_SECURITY=scram (scram-tls is for a remote broker's TLS listener)"
        )
    require_java()
    fetch_jars(settings)
    stopped = [node for node in nodes if running_pid(node.paths) is None]
    for node in nodes:
        for directory in (node.paths.data, node.paths.logs):
            directory.mkdir(parents=True, exist_ok=True)
        # The log segments and the metadata (SCRAM hashes) are read by the broker alone.
        node.paths.root.chmod(0o700)
    settings.kafka_dir.chmod(0o700)
    try:
        for node in stopped:
            _write_config(settings, node, nodes)
        _format_storage(settings, nodes)
        if scram_enabled(settings) and any(not n.paths.admin_marker.exists() for n in stopped):
            _add_admin_credential(settings, stopped, nodes, timeout_s)
    except CredentialsError as exc:
        raise StackError(str(exc)) from None
    started = {node.node_id: _launch(settings, node) for node in stopped}
    _wait_until_answering(nodes, started, timeout_s)
    return [pid for node in nodes if (pid := running_pid(node.paths)) is not None]


def _wait_until_answering(
    nodes: list[BrokerNode], started: dict[int, subprocess.Popen], timeout_s: float
) -> None:
    deadline = time.monotonic() + timeout_s
    for node in nodes:
        process = started.get(node.node_id)
        while not port_open(node.address):
            if process is not None and process.poll() is not None:
                raise StackError(f"broker {node.node_id} exited with {process.returncode}; "
                                 f"see {node.paths.logs}")
            if time.monotonic() > deadline:
                raise StackError(f"broker {node.node_id} did not answer within "
                                 f"{timeout_s:.0f}s; see {node.paths.logs}")
            time.sleep(0.5)


def _add_admin_credential(
    settings: Settings, stopped: list[BrokerNode], nodes: list[BrokerNode], timeout_s: float
) -> None:
    """Storage formatted before the broker was secured has no admin credential, and only the
    admin could add one: start the nodes once as they were (plaintext, no authorizer), add it,
    stop them."""
    from infra.kafka.provisioning import upsert_scram_users

    plaintext = dataclasses.replace(settings, kafka_security="plaintext")
    for node in stopped:
        _write_config(plaintext, node, nodes)
    started = {node.node_id: _launch(plaintext, node) for node in stopped}
    try:
        _wait_until_answering(stopped, started, timeout_s)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                asyncio.run(upsert_scram_users(plaintext, [ADMIN]))
                break
            except Exception as exc:  # noqa: BLE001 - retried until the broker is ready
                if time.monotonic() > deadline:
                    raise StackError(f"adding the admin credential failed: {exc}") from exc
                time.sleep(1.0)
    finally:
        for process in started.values():
            process.terminate()
        for process in started.values():
            process.wait(timeout=60)
        for node in stopped:
            node.paths.pid_file.unlink(missing_ok=True)
    for node in stopped:
        node.paths.admin_marker.touch()
        _write_config(settings, node, nodes)


def _launch(settings: Settings, node: BrokerNode) -> subprocess.Popen:
    with (node.paths.logs / "stdout.log").open("ab") as out:
        process = subprocess.Popen(
            _java_command(settings, node.paths, "kafka.Kafka", str(node.paths.config)),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # the broker outlives the command that started it
        )
    node.paths.pid_file.write_text(str(process.pid))
    return process


def stop_broker(settings: Settings, timeout_s: float = 30.0) -> bool:
    """Stop this home's brokers gracefully (SIGTERM to all at once, then SIGKILL to any still
    running after the timeout). False if none ran."""
    return stop_nodes([node.paths for node in local_nodes(settings)], timeout_s)


def stop_nodes(nodes: list[BrokerPaths], timeout_s: float = 30.0) -> bool:
    """Stop the given nodes; False if none of them ran."""
    running = {paths: pid for paths in nodes if (pid := running_pid(paths)) is not None}
    for pid in running.values():
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while any(running_pid(paths) is not None for paths in running):
        if time.monotonic() > deadline:
            for paths in running:
                if (pid := running_pid(paths)) is not None:
                    os.kill(pid, signal.SIGKILL)
            break
        time.sleep(0.3)
    for paths in nodes:
        paths.pid_file.unlink(missing_ok=True)
    return bool(running)
