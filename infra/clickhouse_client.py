"""ClickHouse access: one client per process and the versioned DDL in `infra/clickhouse/`.

`CLICKHOUSE_URL` is `http(s)://host:port` for a server: by default the local ledger server
(`infra/ledger_server`), which owns the embedded engine's directory and serves every process at
once; or `chdb://DIR` for the embedded engine inside this process (ClickHouse in-process
through clickhouse-connect's chdb backend), which then holds the directory alone. The same DDL
and queries run on both. The embedded engine allows one data directory per process, so clients
are shared per process, and a second directory, or one another process holds, is refused with
a clear error.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import clickhouse_connect
from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import OperationalError

from infra.ledger_server.ownership import DirectoryClaim, DirectoryInUse, claim_directory
from infra.settings import Settings, redact_url

DEFAULT_DATABASE = "loraledger"
DDL_DIR = Path(__file__).resolve().parent / "clickhouse"
_DDL_NAME = re.compile(r"^V(\d{3})__([a-z0-9_]+)\.sql$")
_DATABASE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")

_clients: dict[str, Client] = {}
_claims: list[DirectoryClaim] = []  # the embedded directory this process holds, if any
_lock = threading.Lock()


class ClickHouseConfigError(ValueError):
    """A ClickHouse setting or DDL file that cannot be used; the message says what to fix."""


class LedgerUnavailableError(ClickHouseConfigError):
    """No server answers at CLICKHOUSE_URL; the message says what to start."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()

    def statements(self, database: str) -> list[str]:
        """The file's statements for `database`; `{db}` is the only placeholder."""
        text = "\n".join(
            line for line in self.sql.splitlines() if not line.lstrip().startswith("--")
        )
        return [part.strip().replace("{db}", database) for part in text.split(";") if part.strip()]


def check_database(name: str) -> str:
    if not _DATABASE_NAME.fullmatch(name):
        raise ClickHouseConfigError(
            f"invalid ClickHouse database name {name!r}: use letters, digits and '_', "
            "starting with a letter or '_'"
        )
    return name


def _chdb_path(url: str) -> Path:
    path = Path(url[len("chdb://"):])
    if not path.is_absolute():
        raise ClickHouseConfigError(f"CLICKHOUSE_URL {url!r} needs an absolute path: chdb:///DIR")
    return path


def get_client(settings: Settings) -> Client:
    """The process's client for `settings.clickhouse_url` (created on first use)."""
    url = settings.clickhouse_url
    with _lock:
        if url in _clients:
            return _clients[url]
        if url.startswith("chdb://"):
            embedded = [known for known in _clients if known.startswith("chdb://")]
            if embedded:
                raise ClickHouseConfigError(
                    f"this process already uses embedded ClickHouse at {embedded[0]}; the "
                    "embedded engine serves one directory per process"
                )
            path = _chdb_path(url)
            try:
                claim = claim_directory(path, f"process {os.getpid()} (CLICKHOUSE_URL={url})")
            except DirectoryInUse as exc:
                raise ClickHouseConfigError(str(exc)) from None
            _claims.append(claim)
            client = clickhouse_connect.get_client(dsn=f"chdb://{path}")
        elif url.startswith(("http://", "https://")):
            client = _server_client(settings)
        else:
            raise ClickHouseConfigError(
                f"CLICKHOUSE_URL {url!r} is neither chdb://DIR nor http(s)://host:port"
            )
        _clients[url] = client
        return client


def _server_client(settings: Settings) -> Client:
    url = settings.clickhouse_url
    local_ledger = url == settings.ledger_url
    options: dict[str, object] = {
        # One client serves every thread of the process; a session would serialize them.
        "autogenerate_session_id": False,
    }
    if local_ledger and settings.ledger_password:
        options["password"] = settings.ledger_password
    error: Exception | None = None
    if _listens(url):
        try:
            return clickhouse_connect.get_client(dsn=url, **options)
        except OperationalError as exc:
            error = exc
    if local_ledger:
        raise LedgerUnavailableError(f"no ledger at {url}: run `loraledger stack up`")
    raise LedgerUnavailableError(f"no ClickHouse server answers at {redact_url(url)}"
                                 + (f": {error}" if error else ""))


def _listens(url: str) -> bool:
    """Whether anything accepts connections at the URL (checked first, so that a server that
    is simply not running is one line, not a client's transport warning)."""
    parsed = urlsplit(url)
    port = parsed.port or (8443 if parsed.scheme == "https" else 8123)
    try:
        with socket.create_connection((parsed.hostname or "127.0.0.1", port), timeout=5):
            return True
    except OSError:
        return False


def migrations(ddl_dir: Path = DDL_DIR) -> list[Migration]:
    """The DDL files in version order; a misnamed file or a version gap is an error."""
    found: list[Migration] = []
    for path in sorted(ddl_dir.glob("*.sql")):
        match = _DDL_NAME.match(path.name)
        if not match:
            raise ClickHouseConfigError(f"DDL file {path.name} is not named VNNN__name.sql")
        found.append(Migration(int(match.group(1)), match.group(2), path.read_text()))
    for expected, migration in enumerate(found, start=1):
        if migration.version != expected:
            raise ClickHouseConfigError(f"DDL versions skip from {expected - 1} to "
                                        f"{migration.version}")
    return found


def applied_versions(client: Client, database: str = DEFAULT_DATABASE) -> dict[int, str]:
    """Version -> checksum of the DDL files applied to `database`."""
    check_database(database)
    rows = client.query(
        f"SELECT version, argMax(checksum, applied_at) FROM {database}.schema_migrations "
        "GROUP BY version"
    ).result_rows
    return {int(version): checksum for version, checksum in rows}


def apply_ddl(client: Client, database: str = DEFAULT_DATABASE) -> list[int]:
    """Create `database` and apply every DDL file not applied yet; safe to call any number of
    times (every statement is also IF NOT EXISTS). Returns the versions applied now."""
    check_database(database)
    client.command("CREATE DATABASE IF NOT EXISTS {db:Identifier}", parameters={"db": database})
    client.command(
        f"CREATE TABLE IF NOT EXISTS {database}.schema_migrations "
        "(version UInt32, name String, checksum String, applied_at DateTime64(3, 'UTC')) "
        "ENGINE = ReplacingMergeTree(applied_at) ORDER BY version"
    )
    done = applied_versions(client, database)
    applied: list[int] = []
    for migration in migrations():
        if migration.version in done:
            if done[migration.version] != migration.checksum:
                raise ClickHouseConfigError(
                    f"DDL V{migration.version:03d} changed after it was applied to {database}: "
                    "add a new version instead of editing an applied one"
                )
            continue
        for statement in migration.statements(database):
            client.command(statement)
        client.command(
            f"INSERT INTO {database}.schema_migrations (version, name, checksum, applied_at) "
            "VALUES ({version:UInt32}, {name:String}, {checksum:String}, now64(3))",
            parameters={
                "version": migration.version,
                "name": migration.name,
                "checksum": migration.checksum,
            },
        )
        applied.append(migration.version)
    return applied


def drop_database(client: Client, database: str) -> None:
    client.command("DROP DATABASE IF EXISTS {db:Identifier} SYNC",
                   parameters={"db": check_database(database)})
