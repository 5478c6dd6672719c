"""Who a process is to Kafka, and the client options that say so.

Every component authenticates with SASL/SCRAM-SHA-512 as its own principal, and the broker's
ACLs (`infra.kafka.acls`) decide what each principal may read and write. A principal's password
lives in `<credentials dir>/<principal>/password` (mode 0600, in a directory of mode 0700, so a
container can be given one principal's directory and nothing else); `loraledger stack up`
creates them with random passwords. A process uses LORALEDGER_PRINCIPAL if set, else its
command's own principal (`Settings.acting_as`), else `client`.

LORALEDGER_KAFKA_SECURITY=plaintext turns all of this off: no authentication, no ACLs. It is
never the default.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path
from typing import Any

from aiokafka.errors import (
    ClusterAuthorizationFailedError,
    GroupAuthorizationFailedError,
    TopicAuthorizationFailedError,
    TransactionalIdAuthorizationFailed,
)

from infra.settings import Settings

ADMIN = "admin"  # the broker's super user: provisioning only
CLIENT = "client"  # clients and gateways: requests, proposals and votes, datanets, adapters
WORKER = "worker"  # GPU workers: results
PROCESSOR = "processor"  # the attribution processor: attributions and rewards
GOVERNANCE = "governance"  # the governance agent: tallies and activations
SINK = "sink"  # the ledger sink, when it runs without the governance agent
PRINCIPALS = (ADMIN, CLIENT, WORKER, PROCESSOR, GOVERNANCE, SINK)
DEFAULT_PRINCIPAL = CLIENT

SCRAM_MECHANISM = "SCRAM-SHA-512"
PASSWORD_FILE = "password"


class CredentialsError(RuntimeError):
    """Credentials that are missing, unknown or too widely readable; the message says what to
    do."""


# The broker's answers to a principal doing what its ACLs do not allow.
AUTHORIZATION_ERRORS = (
    TopicAuthorizationFailedError,
    GroupAuthorizationFailedError,
    TransactionalIdAuthorizationFailed,
    ClusterAuthorizationFailedError,
)


def scram_enabled(settings: Settings) -> bool:
    return settings.kafka_security != "plaintext"


def principal_of(settings: Settings) -> str:
    principal = settings.principal or DEFAULT_PRINCIPAL
    if principal not in PRINCIPALS:
        raise CredentialsError(
            f"unknown Kafka principal {principal!r}: use one of {', '.join(PRINCIPALS)}"
        )
    return principal


def password_file(settings: Settings, principal: str) -> Path:
    return settings.credentials_dir / principal / PASSWORD_FILE


def _from_environment(settings: Settings, principal: str) -> bool:
    return settings.kafka_password is not None and settings.principal == principal


def ensure_credentials(settings: Settings) -> list[str]:
    """Give every principal a random password file if it has none (a principal whose password
    the environment supplies gets no file); returns the principals given one now."""
    created = []
    settings.credentials_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    for principal in PRINCIPALS:
        if _from_environment(settings, principal):
            continue
        path = password_file(settings, principal)
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            continue
        with os.fdopen(descriptor, "w") as out:
            # URL-safe characters: nothing that needs quoting in a JAAS or SCRAM config.
            out.write(secrets.token_urlsafe(32))
        created.append(principal)
    return created


def password_for(settings: Settings, principal: str) -> str:
    if _from_environment(settings, principal):
        return settings.kafka_password or ""
    path = password_file(settings, principal)
    try:
        mode = path.stat().st_mode
        password = path.read_text().strip()
    except FileNotFoundError:
        raise CredentialsError(
            f"no password for Kafka principal {principal!r} at {path}: `loraledger stack up` "
            "creates the credentials (or set LORALEDGER_CREDENTIALS_DIR)"
        ) from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise CredentialsError(f"{path} is readable by others: chmod 600 it")
    if not password:
        raise CredentialsError(f"{path} is empty")
    return password


def kafka_client_options(settings: Settings) -> dict[str, Any]:
    """The security options of an aiokafka client (producer, consumer, admin) for the
    settings' principal."""
    if not scram_enabled(settings):
        return {"security_protocol": "PLAINTEXT"}
    principal = principal_of(settings)
    options: dict[str, Any] = {
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": SCRAM_MECHANISM,
        "sasl_plain_username": principal,
        "sasl_plain_password": password_for(settings, principal),
    }
    if settings.kafka_security == "scram-tls":
        from aiokafka.helpers import create_ssl_context

        # The system's trusted CAs (SSL_CERT_FILE points OpenSSL at a private one).
        options.update(security_protocol="SASL_SSL", ssl_context=create_ssl_context())
    return options


def faust_credentials(settings: Settings) -> Any:
    """The same credentials for a Faust app (`broker_credentials`); None in plaintext mode."""
    if not scram_enabled(settings):
        return None
    import faust

    options = kafka_client_options(settings)
    return faust.SASLCredentials(
        username=options["sasl_plain_username"],
        password=options["sasl_plain_password"],
        mechanism=SCRAM_MECHANISM,
        ssl_context=options.get("ssl_context"),
    )
