"""Settings read from the environment, the one place every component gets its configuration.

Every variable here is documented in the README and set by docker-compose.yml; a test checks
that compose sets no variable this module does not read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

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
    "LORALEDGER_KAFKA_SECURITY": "scram (default), scram-tls for a TLS listener, or plaintext",
    "LORALEDGER_PRINCIPAL": "Kafka principal of this process, instead of its command's default",
    "LORALEDGER_CREDENTIALS_DIR": "directory of the principals' password files",
    "LORALEDGER_KAFKA_PASSWORD": "password of LORALEDGER_PRINCIPAL, instead of its password file",
}

# How clients reach Kafka. Plaintext (no authentication, no ACLs) is only ever an explicit choice.
KAFKA_SECURITY_MODES = ("scram", "scram-tls", "plaintext")

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
    kafka_security: str  # one of KAFKA_SECURITY_MODES
    principal: str | None  # None: the command's own principal (see `acting_as`)
    credentials_dir: Path
    kafka_password: str | None = field(repr=False)  # never printed with the settings
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

    def acting_as(self, principal: str) -> Settings:
        """These settings for a component whose own principal is `principal`, unless
        LORALEDGER_PRINCIPAL chose one for the whole process."""
        return self if self.principal else replace(self, principal=principal)

    def as_principal(self, principal: str) -> Settings:
        """These settings authenticating as `principal`, whatever was chosen before."""
        return replace(self, principal=principal)


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


def _choice(env: dict[str, str], name: str, default: str, choices: tuple[str, ...]) -> str:
    value = env.get(name, default)
    if value not in choices:
        raise ValueError(f"{name}={value!r}: use one of {', '.join(choices)}")
    return value


def redact_url(url: str) -> str:
    """`url` with the password of its user part replaced, for printing."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


def load_settings(env: dict[str, str] | None = None) -> Settings:
    """Read settings from `env` (default: the process environment), with local defaults."""
    env = dict(os.environ if env is None else env)
    if env.get("LORALEDGER_KAFKA_PASSWORD") and not env.get("LORALEDGER_PRINCIPAL"):
        raise ValueError(
            "LORALEDGER_KAFKA_PASSWORD is the password of LORALEDGER_PRINCIPAL: set both"
        )
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
        kafka_security=_choice(env, "LORALEDGER_KAFKA_SECURITY", "scram", KAFKA_SECURITY_MODES),
        principal=env.get("LORALEDGER_PRINCIPAL") or None,
        credentials_dir=Path(
            env.get("LORALEDGER_CREDENTIALS_DIR", str(home / "credentials"))
        ).expanduser().resolve(),
        kafka_password=env.get("LORALEDGER_KAFKA_PASSWORD") or None,
    )
