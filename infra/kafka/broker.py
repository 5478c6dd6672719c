"""A single-node Apache Kafka broker (KRaft) run from jars fetched from Maven Central.

The jars are fetched once with Maven into the shared cache (outside any checkout) and reused;
the broker's data and logs live under the stack's home.

Secured (the default), clients authenticate with SASL/SCRAM-SHA-512 on the client listener and
the StandardAuthorizer allows only what an ACL allows (`infra.kafka.acls`); the admin principal
is the one super user. The admin's SCRAM credential is written at storage-format time; the
controller listener accepts only the admin too (SASL/PLAIN against the broker's own config), so
no anonymous connection on either port has any right. The config holds the admin password and
is readable by its owner alone.
"""

from __future__ import annotations

import asyncio
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


def broker_paths(settings: Settings) -> BrokerPaths:
    return BrokerPaths(settings.kafka_dir)


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


def _listeners(settings: Settings, host: str, port: int) -> str:
    client, controller = f"{host}:{port}", f"{host}:{port + 1}"
    common = f"controller.quorum.bootstrap.servers={controller}\n"
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


def _write_config(settings: Settings, paths: BrokerPaths) -> None:
    host, port = host_port(settings.kafka_bootstrap)
    template = (_KAFKA_SRC / "server.properties").read_text()
    config = template + _listeners(settings, host, port) + f"log.dirs={paths.data}\n"
    paths.config.unlink(missing_ok=True)
    descriptor = os.open(paths.config, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as out:
        out.write(config)


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


def _format_storage(settings: Settings, paths: BrokerPaths) -> None:
    if (paths.data / "meta.properties").exists():
        return
    cluster_id = uuid.uuid4().hex[:22]
    scram = []
    if scram_enabled(settings):
        scram = ["--add-scram",
                 f"SCRAM-SHA-512=[name={ADMIN},password={password_for(settings, ADMIN)}]"]
    command = _java_command(
        settings, paths, "kafka.tools.StorageTool",
        "format", "-t", cluster_id, "-c", str(paths.config), "--standalone", *scram,
    )
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode != 0:
        raise StackError(f"formatting the broker's storage failed: {completed.stderr.strip()}")
    if scram:
        paths.admin_marker.touch()


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


def start_broker(settings: Settings, timeout_s: float = 90.0) -> int:
    """Start the broker (if it is not already running) and wait until its port answers."""
    paths = broker_paths(settings)
    pid = running_pid(paths)
    if pid is not None:
        return pid
    if port_open(settings.kafka_bootstrap):
        raise StackError(
            f"something else already listens on {settings.kafka_bootstrap}: stop it, or set "
            "KAFKA_BOOTSTRAP to use that broker without `stack up`"
        )
    if settings.kafka_security == "scram-tls":
        raise StackError(
            "the local broker listens on the loopback interface without TLS: use "
            "LORALEDGER_KAFKA_SECURITY=scram (scram-tls is for a remote broker's TLS listener)"
        )
    require_java()
    fetch_jars(settings)
    for directory in (paths.data, paths.logs):
        directory.mkdir(parents=True, exist_ok=True)
    # The log segments and the metadata (SCRAM hashes) are read by the broker alone.
    paths.root.chmod(0o700)
    try:
        _write_config(settings, paths)
        _format_storage(settings, paths)
        if scram_enabled(settings) and not paths.admin_marker.exists():
            _add_admin_credential(settings, paths, timeout_s)
    except CredentialsError as exc:
        raise StackError(str(exc)) from None
    return _launch(settings, paths, timeout_s).pid


def _launch(settings: Settings, paths: BrokerPaths, timeout_s: float) -> subprocess.Popen:
    with (paths.logs / "stdout.log").open("ab") as out:
        process = subprocess.Popen(
            _java_command(settings, paths, "kafka.Kafka", str(paths.config)),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # the broker outlives the command that started it
        )
    paths.pid_file.write_text(str(process.pid))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise StackError(f"the broker exited with {process.returncode}; see {paths.logs}")
        if port_open(settings.kafka_bootstrap):
            return process
        time.sleep(0.5)
    raise StackError(f"the broker did not answer within {timeout_s:.0f}s; see {paths.logs}")


def _add_admin_credential(settings: Settings, paths: BrokerPaths, timeout_s: float) -> None:
    """Storage formatted before the broker was secured has no admin credential, and only the
    admin could add one: start it once as it was (plaintext, no authorizer), add it, stop."""
    from infra.kafka.provisioning import upsert_scram_users

    plaintext = dataclasses.replace(settings, kafka_security="plaintext")
    _write_config(plaintext, paths)
    process = _launch(plaintext, paths, timeout_s)
    try:
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
        process.terminate()
        process.wait(timeout=60)
        paths.pid_file.unlink(missing_ok=True)
    paths.admin_marker.touch()
    _write_config(settings, paths)


def stop_broker(settings: Settings, timeout_s: float = 30.0) -> bool:
    """Stop the broker gracefully (SIGTERM, then SIGKILL after the timeout). False if none ran."""
    paths = broker_paths(settings)
    pid = running_pid(paths)
    if pid is None:
        paths.pid_file.unlink(missing_ok=True)
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if running_pid(paths) is None:
            break
        time.sleep(0.3)
    else:
        os.kill(pid, signal.SIGKILL)
    paths.pid_file.unlink(missing_ok=True)
    return True
