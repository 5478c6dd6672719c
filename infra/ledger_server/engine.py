"""Statements on the embedded engine, for many clients at once.

The engine (chdb) runs any number of connection handles to the one directory it opens, each
with its own current database, settings and temporary tables, and runs their statements in
parallel. So a request without a session gets a fresh handle, set up with the request's
settings and database and closed afterwards: nothing one request sets reaches another, and a
read never waits for an insert. A session keeps its handle between requests; the request's
settings and database apply to that request only, as on a server, so they are set before the
statement and put back after it.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import chdb

from infra.ledger_server.ownership import DirectoryClaim, claim_directory
from infra.ledger_server.protocol import LedgerError, QueryRequest
from infra.ledger_server.sql import (
    NEED_MORE,
    InlineInsert,
    output_format,
    returns_rows,
    split_inline_insert,
)

# ClickHouse's own limit on a query's text (max_query_size) is far below this; the cap only
# keeps one request from filling the server's memory. Inline INSERT data is streamed instead.
MAX_QUERY_BYTES = 64 * 1024 * 1024
# An INSERT whose FORMAT clause has not appeared by here is not one carrying data.
MAX_INSERT_HEAD_BYTES = 256 * 1024
# chdb's Python layer turns these names into Python objects; they are not ClickHouse formats.
_PYTHON_RESULT_FORMATS = frozenset({"dataframe", "datastore", "arrowtable"})


@dataclass(frozen=True)
class Outcome:
    body: bytes
    fmt: str | None  # the output format of a statement that returns rows
    summary: dict[str, str]


@dataclass
class _Session:
    handle: Any
    timeout_s: float
    last_used: float
    lock: threading.Lock = field(default_factory=threading.Lock)


def _quote(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace("'", "\\'")
    return f"'{escaped}'"


def _quote_identifier(name: str) -> str:
    escaped = name.replace("\\", "\\\\").replace("`", "\\`")
    return f"`{escaped}`"


def _summary(result: Any, rows_read: bool) -> dict[str, str]:
    """ClickHouse's X-ClickHouse-Summary keys from a query result or an insert result."""
    def value(name: str) -> int:
        attribute = getattr(result, name, 0)
        return int(attribute() if callable(attribute) else attribute)

    elapsed = getattr(result, "elapsed", 0.0)
    elapsed = elapsed() if callable(elapsed) else elapsed
    summary = {
        "read_rows": value("rows_read") if rows_read else 0,
        "read_bytes": value("bytes_read") if rows_read else 0,
        "written_rows": value("rows_written"),
        "written_bytes": value("bytes_written"),
        "total_rows_to_read": 0,
        "elapsed_ns": int(float(elapsed) * 1e9),
    }
    return {name: str(number) for name, number in summary.items()}


class LedgerEngine:
    """Owns one chdb directory for this process and runs requests' statements on it."""

    def __init__(self, path: Path, owner: str) -> None:
        self.path = path
        self._claim: DirectoryClaim = claim_directory(path, owner)
        try:
            # This handle keeps the engine open while no request holds one.
            self._root = chdb.connect(str(path))
            version, timezone = self._root.query(
                "SELECT version(), timezone()", "TabSeparated"
            ).bytes().decode().strip().split("\t")
            names = self._root.query(
                "SELECT name FROM system.formats WHERE is_output", "TabSeparated"
            ).bytes().decode().split()
        except BaseException:
            self._claim.release()
            raise
        self.version = version
        self.timezone = timezone
        self.output_formats = {name.lower(): name for name in names}
        self._sessions: dict[str, _Session] = {}
        self._sessions_lock = threading.Lock()

    def close(self) -> None:
        with self._sessions_lock:
            for session in self._sessions.values():
                with suppress(Exception):
                    session.handle.close()
            self._sessions.clear()
        with suppress(Exception):
            self._root.close()
        self._claim.release()

    def execute(self, request: QueryRequest, body: Iterable[bytes]) -> Outcome:
        """Run the request's statement: its query text, then its body (decoded), which holds
        the rest of the query or an INSERT's rows."""
        chunks = iter(body)
        head = bytearray(request.query + b"\n" if request.query else b"")
        exhausted = False
        while True:
            found = split_inline_insert(bytes(head), complete=exhausted)
            if found is not NEED_MORE:
                break
            if len(head) > MAX_INSERT_HEAD_BYTES:
                found = None
                break
            chunk = next(chunks, None)
            if chunk is None:
                exhausted = True
            else:
                head += chunk
        with self._handle(request) as handle:
            if isinstance(found, InlineInsert):
                return self._insert(handle, found, bytes(head), chunks)
            return self._query(handle, request, bytes(head), chunks)

    def _query(self, handle: Any, request: QueryRequest, head: bytes,
               chunks: Iterator[bytes]) -> Outcome:
        parts = [head]
        size = len(head)
        for chunk in chunks:
            size += len(chunk)
            if size > MAX_QUERY_BYTES:
                raise LedgerError(62, "SYNTAX_ERROR",
                                  f"Max query size exceeded: the query text is over "
                                  f"{MAX_QUERY_BYTES} bytes")
            parts.append(chunk)
        text = b"".join(parts)
        if not text.strip():
            raise LedgerError(62, "SYNTAX_ERROR", "Empty query")
        if request.default_format.lower() in _PYTHON_RESULT_FORMATS:
            raise LedgerError(73, "UNKNOWN_FORMAT", f"Unknown format {request.default_format}")
        try:
            result = handle.query(text, request.default_format, params=request.parameters)
        except Exception as exc:  # noqa: BLE001 - chdb raises its own and RuntimeError
            raise LedgerError.from_engine(exc) from None
        fmt = None
        if returns_rows(text):
            fmt = output_format(text, self.output_formats) or request.default_format
        return Outcome(result.bytes() or b"", fmt, _summary(result, rows_read=True))

    def _insert(self, handle: Any, insert: InlineInsert, head: bytes,
                chunks: Iterator[bytes]) -> Outcome:
        try:
            statement = insert.statement.decode()
        except UnicodeDecodeError:
            raise LedgerError(62, "SYNTAX_ERROR", "the INSERT statement is not UTF-8") from None
        try:
            inserter = handle.send_insert(statement, insert.input_format)
        except Exception as exc:  # noqa: BLE001
            raise LedgerError.from_engine(exc) from None
        try:
            first = head[insert.data_start:]
            if first:
                inserter.append(first)
            for chunk in chunks:
                inserter.append(chunk)
            result = inserter.finish()
        except BaseException as exc:
            with suppress(Exception):
                inserter.cancel()
            if isinstance(exc, LedgerError | KeyboardInterrupt | SystemExit):
                raise
            raise LedgerError.from_engine(exc) from None
        return Outcome(b"", None, _summary(result, rows_read=False))

    # --- handles ----------------------------------------------------------------------------

    def _connect(self) -> Any:
        try:
            return chdb.connect(str(self.path))
        except Exception as exc:  # noqa: BLE001
            raise LedgerError.from_engine(exc) from None

    @staticmethod
    def _run(handle: Any, sql: str, fmt: str = "TabSeparated") -> bytes:
        try:
            return handle.query(sql, fmt).bytes() or b""
        except Exception as exc:  # noqa: BLE001
            raise LedgerError.from_engine(exc) from None

    def _apply(self, handle: Any, settings: dict[str, str], database: str | None) -> None:
        if settings:
            assignments = ", ".join(f"{name} = {_quote(value)}" for name, value in settings.items())
            self._run(handle, f"SET {assignments}")
        if database:
            self._run(handle, f"USE {_quote_identifier(database)}")

    @contextmanager
    def _handle(self, request: QueryRequest) -> Iterator[Any]:
        # `readonly` cannot be set back once set, so read-only requests never touch a session.
        if request.session_id is None or request.read_only or "readonly" in request.settings:
            handle = self._connect()
            try:
                self._apply(handle, request.settings, request.database)
                yield handle
            finally:
                with suppress(Exception):
                    handle.close()
            return
        session = self._enter_session(request)
        try:
            with self._request_scope(session.handle, request):
                yield session.handle
        finally:
            session.last_used = time.monotonic()
            session.lock.release()

    @contextmanager
    def _request_scope(self, handle: Any, request: QueryRequest) -> Iterator[None]:
        """The request's settings and database on a session's handle, restored after."""
        settings, database = request.settings, request.database
        saved: list[dict[str, Any]] = []
        if settings:
            names = ", ".join(_quote(name) for name in settings)
            # JSONEachRow keeps values such as 'auto(4)' byte for byte.
            rows = self._run(handle, "SELECT name, value, changed FROM system.settings "
                                     f"WHERE name IN ({names})", "JSONEachRow")
            saved = [json.loads(line) for line in rows.splitlines()]
        previous_database = (self._run(handle, "SELECT currentDatabase()").decode().strip()
                             if database else None)
        try:
            self._apply(handle, settings, database)
            yield
        finally:
            restore = [f"{name} = DEFAULT" for name in settings
                       if name not in {row["name"] for row in saved if row["changed"]}]
            restore += [f"{row['name']} = {_quote(row['value'])}" for row in saved
                        if row["changed"]]
            with suppress(LedgerError):
                if restore:
                    self._run(handle, "SET " + ", ".join(restore))
                if previous_database:
                    self._run(handle, f"USE {_quote_identifier(previous_database)}")

    def _enter_session(self, request: QueryRequest) -> _Session:
        session_id = request.session_id
        assert session_id is not None
        now = time.monotonic()
        with self._sessions_lock:
            self._expire_sessions(now)
            session = self._sessions.get(session_id)
            if session is None:
                if request.session_check:
                    raise LedgerError(372, "SESSION_NOT_FOUND",
                                      f"Session {session_id} not found")
                session = _Session(self._connect(), request.session_timeout_s, now)
                self._sessions[session_id] = session
            if not session.lock.acquire(blocking=False):
                raise LedgerError(373, "SESSION_IS_LOCKED",
                                  f"Session {session_id} is locked by a concurrent client")
            session.timeout_s = request.session_timeout_s
            return session

    def _expire_sessions(self, now: float) -> None:
        for session_id, session in list(self._sessions.items()):
            if now - session.last_used > session.timeout_s and session.lock.acquire(False):
                del self._sessions[session_id]
                with suppress(Exception):
                    session.handle.close()
