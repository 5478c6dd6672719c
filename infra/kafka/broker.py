"""A single-node Apache Kafka broker (KRaft) run from jars fetched from Maven Central.

The jars are fetched once with Maven into the shared cache (outside any checkout) and reused;
the broker's data and logs live under the stack's home.
"""

from __future__ import annotations

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


def _host_port(bootstrap: str) -> tuple[str, int]:
    first = bootstrap.split(",")[0].strip()
    host, _, port = first.rpartition(":")
    return host or "127.0.0.1", int(port or 9092)


def port_open(bootstrap: str, timeout: float = 0.5) -> bool:
    host, port = _host_port(bootstrap)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _write_config(paths: BrokerPaths, bootstrap: str) -> None:
    host, port = _host_port(bootstrap)
    template = (_KAFKA_SRC / "server.properties").read_text()
    config = template.replace("127.0.0.1:9092", f"{host}:{port}").replace(
        "127.0.0.1:9093", f"{host}:{port + 1}"
    )
    paths.config.write_text(config + f"log.dirs={paths.data}\n")


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
    command = _java_command(
        settings, paths, "kafka.tools.StorageTool",
        "format", "-t", cluster_id, "-c", str(paths.config), "--standalone",
    )
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode != 0:
        raise StackError(f"formatting the broker's storage failed: {completed.stderr.strip()}")


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
    require_java()
    fetch_jars(settings)
    for directory in (paths.data, paths.logs):
        directory.mkdir(parents=True, exist_ok=True)
    _write_config(paths, settings.kafka_bootstrap)
    _format_storage(settings, paths)
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
            return process.pid
        time.sleep(0.5)
    raise StackError(f"the broker did not answer within {timeout_s:.0f}s; see {paths.logs}")


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
