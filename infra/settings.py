"""Settings read from the environment, the one place every component gets its configuration.

Every variable here is documented in the README and set by docker-compose.yml; a test checks
that compose sets no variable this module does not read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

ENV_VARS: dict[str, str] = {
    "LORALEDGER_HOME": "directory for local state (broker data, ClickHouse, adapters, datanets)",
    "KAFKA_BOOTSTRAP": "Kafka bootstrap servers, host:port[,host:port]",
    "LORALEDGER_TOPIC_PREFIX": "prefix for every topic name, so several stacks share a cluster",
    "CLICKHOUSE_URL": "the ledger: http(s)://host:port of a ClickHouse server (default: the local "
                      "ledger server), or chdb://DIR for the embedded engine in this process",
    "LORALEDGER_DEVICE": "torch device for the worker and generation: cpu or cuda",
    "LORALEDGER_WORKER_ID": "identity of a GPU worker, credited as compute operator",
    "LORALEDGER_BASE_MODEL": "directory of the Hugging Face base model checkpoint",
    "LORALEDGER_METRICS_PORT": "port of the worker's Prometheus endpoint (0 disables it)",
    "LORALEDGER_CACHE": "cache for slow-to-build artifacts shared by checkouts (base model, jars)",
    "LORALEDGER_EPOCH_SECONDS": "length of a reward and governance epoch in seconds",
    "LORALEDGER_LEDGER_PORT": "port of the local ledger server (ClickHouse's HTTP interface on "
                              "127.0.0.1 over $LORALEDGER_HOME/clickhouse)",
    "LORALEDGER_LEDGER_PASSWORD": "password of the local ledger server's `default` user "
                                  "(empty: no authentication)",
    "LORALEDGER_GATEWAY_PORT": "port of the OpenAI-compatible gateway (`loraledger serve`)",
    "LORALEDGER_GATEWAY_TIMEOUT_S": "seconds the gateway waits for a result before answering 504",
    "LORALEDGER_GATEWAY_MAX_IN_FLIGHT": "requests a gateway holds at once before answering 429",
}

LEDGER_HOST = "127.0.0.1"


def _ledger_url(port: int) -> str:
    return f"http://{LEDGER_HOST}:{port}"


@dataclass(frozen=True)
class Settings:
    home: Path
    kafka_bootstrap: str
    topic_prefix: str
    clickhouse_url: str
    device: str
    worker_id: str
    base_model_dir: Path
    metrics_port: int
    cache_dir: Path
    epoch_seconds: int
    ledger_port: int
    ledger_password: str
    gateway_port: int = 8000
    gateway_timeout_s: float = 60.0
    gateway_max_in_flight: int = 256

    @property
    def adapters_dir(self) -> Path:
        return self.home / "adapters"

    @property
    def datanets_dir(self) -> Path:
        return self.home / "datanets"

    @property
    def kafka_dir(self) -> Path:
        return self.home / "kafka"

    @property
    def ledger_dir(self) -> Path:
        """The embedded ClickHouse directory the local ledger server owns."""
        return self.home / "clickhouse"

    @property
    def ledger_url(self) -> str:
        return _ledger_url(self.ledger_port)


def _positive_int(env: dict[str, str], name: str, default: int) -> int:
    raw = env.get(name, str(default))
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not an integer") from None
    if value <= 0:
        raise ValueError(f"{name}={raw!r} must be positive")
    return value


def _positive_float(env: dict[str, str], name: str, default: float) -> float:
    raw = env.get(name, str(default))
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number") from None
    if not 0 < value < float("inf"):
        raise ValueError(f"{name}={raw!r} must be a positive number of seconds")
    return value


def _port(env: dict[str, str], name: str, default: int) -> int:
    raw = env.get(name, str(default))
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise ValueError(f"{name}={raw!r} is not a TCP port (1-65535)")
    return int(raw)


def load_settings(env: dict[str, str] | None = None) -> Settings:
    """Read settings from `env` (default: the process environment), with local defaults."""
    env = dict(os.environ if env is None else env)
    home = Path(env.get("LORALEDGER_HOME", ".loraledger")).expanduser().resolve()
    ledger_port = _port(env, "LORALEDGER_LEDGER_PORT", 8123)
    return Settings(
        home=home,
        kafka_bootstrap=env.get("KAFKA_BOOTSTRAP", "127.0.0.1:9092"),
        topic_prefix=env.get("LORALEDGER_TOPIC_PREFIX", ""),
        clickhouse_url=env.get("CLICKHOUSE_URL", _ledger_url(ledger_port)),
        device=env.get("LORALEDGER_DEVICE", "cpu"),
        worker_id=env.get("LORALEDGER_WORKER_ID", "worker-local"),
        base_model_dir=Path(env.get("LORALEDGER_BASE_MODEL", str(home / "base-model"))),
        metrics_port=int(env.get("LORALEDGER_METRICS_PORT", "0")),
        cache_dir=Path(env.get("LORALEDGER_CACHE", "~/.cache/loraledger")).expanduser(),
        epoch_seconds=_positive_int(env, "LORALEDGER_EPOCH_SECONDS", 3600),
        ledger_port=ledger_port,
        ledger_password=env.get("LORALEDGER_LEDGER_PASSWORD", ""),
        gateway_port=_positive_int(env, "LORALEDGER_GATEWAY_PORT", 8000),
        gateway_timeout_s=_positive_float(env, "LORALEDGER_GATEWAY_TIMEOUT_S", 60.0),
        gateway_max_in_flight=_positive_int(env, "LORALEDGER_GATEWAY_MAX_IN_FLIGHT", 256),
    )
