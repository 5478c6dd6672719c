"""ClickHouse client and versioned DDL on the embedded engine."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import pytest

from infra.clickhouse_client import (
    ClickHouseConfigError,
    applied_versions,
    apply_ddl,
    check_database,
    drop_database,
    get_client,
    migrations,
)
from infra.settings import load_settings


@pytest.fixture(scope="module")
def client():
    # One embedded engine per process: test modules share this directory, tests use databases.
    path = Path(tempfile.gettempdir()) / f"loraledger-test-chdb-{os.getpid()}"
    atexit.register(shutil.rmtree, path, True)
    return get_client(load_settings({"CLICKHOUSE_URL": f"chdb://{path}"}))


@pytest.fixture
def database(client):
    name = f"t_{uuid.uuid4().hex[:12]}"
    yield name
    drop_database(client, name)


def test_migrations_are_numbered_from_one_without_gaps():
    found = migrations()
    assert [m.version for m in found] == list(range(1, len(found) + 1))
    assert all("{db}." in m.sql for m in found)


def test_ddl_applies_twice_and_records_versions(client, database):
    versions = [m.version for m in migrations()]
    assert apply_ddl(client, database) == versions
    assert apply_ddl(client, database) == []
    assert sorted(applied_versions(client, database)) == versions
    # Every statement is IF NOT EXISTS too, so even re-running the files is harmless.
    for migration in migrations():
        for statement in migration.statements(database):
            client.command(statement)


def test_an_edited_applied_migration_is_refused(client, database):
    apply_ddl(client, database)
    client.command(
        f"INSERT INTO {database}.schema_migrations VALUES "
        "(1, 'ledger', 'not-the-checksum', now64(3) + 1)"
    )
    with pytest.raises(ClickHouseConfigError, match="V001 changed"):
        apply_ddl(client, database)


def test_same_url_shares_one_client_and_a_second_embedded_dir_is_refused(client, tmp_path):
    path = Path(tempfile.gettempdir()) / f"loraledger-test-chdb-{os.getpid()}"
    assert get_client(load_settings({"CLICKHOUSE_URL": f"chdb://{path}"})) is client
    with pytest.raises(ClickHouseConfigError, match="one directory per process"):
        get_client(load_settings({"CLICKHOUSE_URL": f"chdb://{tmp_path / 'other'}"}))


def test_bad_settings_are_one_line_errors():
    with pytest.raises(ClickHouseConfigError, match="neither chdb"):
        get_client(load_settings({"CLICKHOUSE_URL": "mysql://host"}))
    with pytest.raises(ClickHouseConfigError, match="invalid ClickHouse database name"):
        check_database("ledger; DROP TABLE x")
    with pytest.raises(ClickHouseConfigError, match="invalid ClickHouse database name"):
        check_database("ledger\n")
