"""The ledger server as the stack runs it: a real background process on a free port with its
own home, read and written by standard ClickHouse clients at the same time (no broker)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import clickhouse_connect
import pytest
from clickhouse_connect.driver.exceptions import DatabaseError

from infra.clickhouse_client import LedgerUnavailableError, apply_ddl, get_client
from infra.ledger_server.process import ledger_paths, start_ledger, stop_ledger
from infra.settings import Settings, load_settings
from infra.stack import stack_status
from pipeline.ledger import LedgerWriter
from schemas.events import RewardEntry, RewardRole, reward_entry_id

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[2]
BENEFICIARIES = [f"b{index}" for index in range(7)]
BATCHES = 12
BATCH_ROWS = 150
WAIT_S = 60.0  # generous: the machine may be busy


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def ledger_settings(home: Path, **extra: str) -> Settings:
    # KAFKA_BOOTSTRAP names a closed port: these tests need no broker.
    return load_settings({"LORALEDGER_HOME": str(home), "LORALEDGER_LEDGER_PORT": str(free_port()),
                          "KAFKA_BOOTSTRAP": "127.0.0.1:1", **extra})


@pytest.fixture(scope="module")
def ledger(tmp_path_factory):
    settings = ledger_settings(tmp_path_factory.mktemp("ledger-home"))
    start_ledger(settings)
    yield settings
    stop_ledger(settings)


def connect(settings: Settings, **options) -> clickhouse_connect.driver.client.Client:
    return clickhouse_connect.get_client(host="127.0.0.1", port=settings.ledger_port, **options)


def http_get(settings: Settings, query: str, **params: str) -> bytes:
    url = f"{settings.ledger_url}/?" + urllib.parse.urlencode({"query": query, **params})
    with urllib.request.urlopen(url, timeout=WAIT_S) as reply:
        return reply.read()


def entry(request_index: int, beneficiary: str) -> RewardEntry:
    request_id = f"req-{request_index}"
    return RewardEntry(
        entry_id=reward_entry_id(request_id, beneficiary, RewardRole.COMPUTE_OPERATOR.value, None),
        request_id=request_id, adapter_id="ad-1", epoch=3, beneficiary_id=beneficiary,
        role=RewardRole.COMPUTE_OPERATOR, amount=request_index % 50, fee_total=100,
        parameters_version=0,
    )


@dataclass
class Reader:
    """Reads the row count over and over until told to stop, recording what it saw."""

    name: str
    read_count: Callable[[], int]
    seen: list[int]
    errors: list[BaseException]
    reads: int = 0

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.seen.append(self.read_count())
            except BaseException as exc:  # noqa: BLE001 - the test reports every failure
                self.errors.append(exc)
                return
            self.reads += 1


def test_readers_see_every_batch_while_a_writer_inserts(ledger):
    database = f"t_{uuid.uuid4().hex[:12]}"
    writer_client = connect(ledger, autogenerate_session_id=False)
    apply_ddl(writer_client, database)
    # The database is a bound parameter, {db:Identifier}, in every query below.
    count_sql = ("SELECT count() FROM {db:Identifier}.reward_entries WHERE epoch = {epoch:UInt64} "
                 "AND beneficiary_id IN {who:Array(String)}")
    # A long list of bound values goes as a multipart form, as clients send it.
    long_list = BENEFICIARIES + [f"nobody-{index}" for index in range(3000)]

    def native_client_read(client):
        return lambda: client.query(count_sql, parameters={"db": database, "epoch": 3,
                                                       "who": long_list}
                                    ).result_rows[0][0]

    def url_read() -> int:
        return int(http_get(
            ledger,
            "SELECT count() FROM {db:Identifier}.reward_entries WHERE amount >= {low:UInt64}",
            param_db=database, param_low="0"))

    readers = [
        Reader("clickhouse-connect 1", native_client_read(connect(ledger)), [], []),
        Reader("clickhouse-connect 2", native_client_read(connect(ledger, compress=False)), [], []),
        Reader("urllib", url_read, [], []),
    ]
    stop = threading.Event()
    threads = [threading.Thread(target=reader.run, args=(stop,)) for reader in readers]
    for thread in threads:
        thread.start()
    written = 0
    try:
        writer = LedgerWriter(writer_client, database)
        for batch in range(BATCHES):
            start = batch * BATCH_ROWS
            events = [entry(index, BENEFICIARIES[index % len(BENEFICIARIES)])
                      for index in range(start, start + BATCH_ROWS)]
            written += writer.write(events)["reward_entries"]
            # Two more reads each: the second began after this batch was in, so every reader
            # sees every batch before the next one goes in.
            after = [reader.reads + 2 for reader in readers]
            deadline = time.monotonic() + WAIT_S
            while time.monotonic() < deadline and not any(r.errors for r in readers) and any(
                reader.reads < wanted for reader, wanted in zip(readers, after, strict=True)
            ):
                time.sleep(0.01)
    finally:
        stop.set()
        for thread in threads:
            thread.join(WAIT_S)
    for reader in readers:
        assert not reader.errors, f"{reader.name}: {reader.errors[0]!r}"
        assert reader.seen == sorted(reader.seen), f"{reader.name} saw rows disappear"
        batch_totals = {BATCH_ROWS * (batch + 1) for batch in range(BATCHES)}
        assert batch_totals <= set(reader.seen), f"{reader.name} missed a batch"
        assert max(reader.seen) == written
    assert written == BATCHES * BATCH_ROWS
    expected_amount = sum(index % 50 for index in range(written))
    assert int(http_get(ledger, "SELECT count() FROM {db:Identifier}.reward_entries",
                        param_db=database)) == written
    total = connect(ledger).query(
        "SELECT sum(amount) FROM {db:Identifier}.reward_entries WHERE epoch = {e:UInt64}",
                                  parameters={"db": database, "e": 3}).result_rows[0][0]
    assert total == expected_amount
    if shutil.which("curl"):
        plain = subprocess.run(
            ["curl", "-sS", "--fail-with-body", "--data-binary",
             "SELECT count() FROM {db:Identifier}.reward_entries "
             "WHERE beneficiary_id = {who:String}",
             f"{ledger.ledger_url}/?param_who=b0&param_db={database}"],
            capture_output=True, text=True, timeout=WAIT_S,
        )
        assert plain.returncode == 0, plain.stdout + plain.stderr
        assert int(plain.stdout) == sum(1 for index in range(written) if index % 7 == 0)


def test_errors_come_back_as_database_errors_with_clickhouse_messages(ledger):
    client = connect(ledger)
    with pytest.raises(DatabaseError, match="Database no_such_db does not exist") as missing:
        client.query("SELECT * FROM no_such_db.no_such_table")
    assert (missing.value.code, missing.value.name) == (81, "UNKNOWN_DATABASE")
    with pytest.raises(DatabaseError, match="SYNTAX_ERROR"):
        client.command("SELEKT 1")
    with pytest.raises(DatabaseError, match="Unknown setting"):
        client.query("SELECT 1", settings={"no_such_setting": 1})
    with pytest.raises(urllib.error.HTTPError) as readonly:
        http_get(ledger, "CREATE DATABASE from_a_get")
    assert readonly.value.code == 403
    assert readonly.value.headers["X-ClickHouse-Exception-Code"] == "164"
    assert "READONLY" in readonly.value.read().decode()


def test_a_session_keeps_its_state_and_settings_stay_with_their_query(ledger):
    client = connect(ledger)  # clickhouse-connect sends a session id by default
    client.command("CREATE TEMPORARY TABLE scratch (a UInt8)")
    client.command("INSERT INTO scratch VALUES (1), (2)")
    assert client.query("SELECT count() FROM scratch").result_rows == [(2,)]
    assert client.query("SELECT getSetting('max_block_size')",
                        settings={"max_block_size": 1234}).result_rows == [(1234,)]
    assert client.query("SELECT getSetting('max_block_size')").result_rows != [(1234,)]
    other = connect(ledger)
    with pytest.raises(DatabaseError, match="scratch"):
        other.query("SELECT count() FROM scratch")


def test_the_directory_has_one_owner_and_others_are_told_who(ledger):
    env = {**os.environ, "LORALEDGER_HOME": str(ledger.home),
           "LORALEDGER_LEDGER_PORT": str(free_port())}
    second = subprocess.run(
        [sys.executable, "-m", "loraledger.cli", "ledger", "serve"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert second.returncode == 1
    message = " ".join(second.stderr.split())
    assert "in use by the ledger server (pid " in message
    assert f"at {ledger.ledger_url}" in message
    embedded = subprocess.run(
        [sys.executable, "-m", "loraledger.cli", "query", "rewards"], cwd=REPO_ROOT,
        env={**env, "CLICKHOUSE_URL": f"chdb://{ledger.ledger_dir}"},
        capture_output=True, text=True, timeout=300,
    )
    assert embedded.returncode == 1
    assert f"at {ledger.ledger_url}" in embedded.stderr.splitlines()[-1]


def test_the_default_url_is_the_local_ledger_and_a_missing_one_says_what_to_run(ledger):
    settings = load_settings({"LORALEDGER_HOME": str(ledger.home),
                              "LORALEDGER_LEDGER_PORT": str(ledger.ledger_port)})
    assert settings.clickhouse_url == ledger.ledger_url
    assert get_client(settings).command("SELECT 1") == 1
    nobody = load_settings({"LORALEDGER_LEDGER_PORT": str(free_port())})
    with pytest.raises(LedgerUnavailableError) as info:
        get_client(nobody)
    message = f"no ledger at {nobody.ledger_url}: run `loraledger stack up`"
    assert str(info.value) == message
    env = {name: value for name, value in os.environ.items() if name != "CLICKHOUSE_URL"}
    cli = subprocess.run(
        [sys.executable, "-m", "loraledger.cli", "query", "rewards"], cwd=REPO_ROOT,
        env={**env, "LORALEDGER_LEDGER_PORT": str(nobody.ledger_port)},
        capture_output=True, text=True, timeout=300,
    )
    assert (cli.returncode, cli.stderr) == (1, f"error: {message}\n")


def test_the_stack_starts_reports_and_stops_a_password_protected_ledger(tmp_path):
    settings = ledger_settings(tmp_path, LORALEDGER_LEDGER_PASSWORD="s3cret")
    pid = start_ledger(settings)
    try:
        assert start_ledger(settings) == pid  # a second `stack up` reuses it
        state = stack_status(settings)
        assert (state.local_ledger, state.ledger_pid, state.ledger_answers) == (True, pid, True)
        with pytest.raises(DatabaseError, match="AUTHENTICATION_FAILED"):
            connect(settings)
        assert connect(settings, password="s3cret").command("SELECT 1") == 1
        assert get_client(settings).command("SELECT 2") == 2  # the settings carry the password
    finally:
        assert stop_ledger(settings)
    state = stack_status(settings)
    assert (state.ledger_pid, state.ledger_answers) == (None, False)
    assert not ledger_paths(settings).pid_file.exists()
    assert "serving" in ledger_paths(settings).log_file.read_text()
