"""ClickHouse's HTTP interface, the part clients use: an HTTP request becomes a `QueryRequest`,
and an error becomes the status, code and text a ClickHouse server would send.

What the server reads from a request: the query from the `query` parameter and/or the body
(the body follows the parameter, after a line break, as on a server), `database`,
`default_format`, `param_<name>` bound parameters (in the URL or a multipart form), `session_id`
with `session_timeout` and `session_check`, `query_id`, credentials, and any other parameter as
a ClickHouse setting for this query. Request bodies may be compressed (Content-Encoding gzip,
deflate, zstd or lz4); responses are sent uncompressed, which every client accepts.
"""

from __future__ import annotations

import base64
import re
import uuid
import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

# Request parameters the HTTP layer consumes; every other parameter is a setting.
TRANSPORT_PARAMETERS = frozenset({
    "query", "database", "default_format", "session_id", "session_timeout", "session_check",
    "query_id", "user", "password", "quota_key", "buffer_size", "wait_end_of_query",
    "client_protocol_version", "role", "stacktrace", "compress", "decompress",
})
# Settings that only shape a server's HTTP responses (progress headers, response compression,
# cancelling on disconnect); this server answers once, uncompressed, so they change nothing.
HTTP_ONLY_SETTINGS = frozenset({
    "send_progress_in_http_headers", "http_headers_progress_interval_ms",
    "enable_http_compression", "http_zlib_compression_level",
    "cancel_http_readonly_queries_on_client_close", "http_wait_end_of_query",
    "http_response_buffer_size",
})
DEFAULT_FORMAT = "TabSeparated"
DEFAULT_SESSION_TIMEOUT_S = 60.0
MAX_SESSION_TIMEOUT_S = 3600.0
_SETTING_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_ERROR_CODE = re.compile(r"Code: (\d+)\.")
_ERROR_NAME = re.compile(r"\(([A-Z][A-Z0-9_]+)\)(?: \(version [^)]*\))?\s*$")
_VERSION_TRAILER = re.compile(r"\(version [^)]*\)\s*$")

_CONTENT_TYPES = {
    "TabSeparated": "text/tab-separated-values; charset=UTF-8",
    "TSV": "text/tab-separated-values; charset=UTF-8",
    "CSV": "text/csv; charset=UTF-8; header=absent",
    "CSVWithNames": "text/csv; charset=UTF-8; header=present",
    "JSON": "application/json; charset=UTF-8",
    "JSONCompact": "application/json; charset=UTF-8",
    "JSONEachRow": "application/x-ndjson; charset=UTF-8",
    "Native": "application/octet-stream",
    "RowBinary": "application/octet-stream",
    "RowBinaryWithNamesAndTypes": "application/octet-stream",
    "Arrow": "application/octet-stream",
    "Parquet": "application/octet-stream",
}


class LedgerError(Exception):
    """A failed request, shaped like a ClickHouse exception: its code, symbolic name and
    message reach the client in the body and the X-ClickHouse-Exception-Code header."""

    def __init__(self, code: int, name: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.name = name
        self.message = message

    @classmethod
    def from_engine(cls, exc: BaseException) -> LedgerError:
        """The engine's own exception text carries `Code: N.` and `(NAME)`; keep it whole."""
        text = str(exc).strip()
        start = text.find("Code: ")
        if start > 0:
            text = text[start:]
        code = _ERROR_CODE.search(text)
        name = _ERROR_NAME.search(text)
        return cls(int(code.group(1)) if code else 1001, name.group(1) if name else
                   "STD_EXCEPTION", text)

    def body(self, version: str) -> str:
        text = self.message
        if not text.startswith("Code: "):
            text = f"Code: {self.code}. DB::Exception: {text}. ({self.name})"
        if not _VERSION_TRAILER.search(text):
            text = f"{text} (version {version})"
        return text + "\n"

    @property
    def http_status(self) -> int:
        """The status a ClickHouse server sends for this code (clients retry some 5xx, so
        errors in the query are never sent as 503)."""
        name = self.name
        if name in ("REQUIRED_PASSWORD",):
            return 401
        if name in ("AUTHENTICATION_FAILED", "UNKNOWN_USER", "WRONG_PASSWORD", "ACCESS_DENIED",
                    "READONLY"):
            return 403
        if name.startswith("CANNOT_PARSE") or name in (
            "SYNTAX_ERROR", "BAD_ARGUMENTS", "INCORRECT_DATA", "TYPE_MISMATCH",
            "DUPLICATE_COLUMN", "ILLEGAL_COLUMN", "VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE",
            "BAD_QUERY_PARAMETER", "UNKNOWN_QUERY_PARAMETER", "CANNOT_DECOMPRESS",
        ):
            return 400
        if name.startswith("UNKNOWN_") and name != "UNKNOWN_EXCEPTION":
            return 404
        if name == "SESSION_NOT_FOUND":
            return 404
        if name == "NOT_IMPLEMENTED":
            return 501
        if name == "TIMEOUT_EXCEEDED":
            return 408
        return 500


@dataclass(frozen=True)
class QueryRequest:
    query: bytes  # from the `query` parameter; the request body follows it
    database: str | None
    default_format: str
    settings: dict[str, str]
    parameters: dict[str, str]  # bound parameters, without the `param_` prefix
    session_id: str | None
    session_timeout_s: float
    session_check: bool
    query_id: str
    read_only: bool  # a GET: only reads, as on a server


def parse_request(method: str, fields: Iterable[tuple[str, str]]) -> QueryRequest:
    """The request's URL parameters (and multipart form fields) as a `QueryRequest`."""
    query = ""
    transport: dict[str, str] = {}
    settings: dict[str, str] = {}
    parameters: dict[str, str] = {}
    for name, value in fields:
        if name.startswith("param_"):
            parameters[name[len("param_"):]] = value
        elif name == "query":
            query = value
        elif name in TRANSPORT_PARAMETERS:
            transport[name] = value
        elif name not in HTTP_ONLY_SETTINGS:
            if not _SETTING_NAME.match(name):
                raise LedgerError(115, "UNKNOWN_SETTING", f"Unknown setting '{name}'")
            settings[name] = value
    for unsupported in ("compress", "decompress"):
        if transport.get(unsupported, "0") not in ("0", ""):
            raise LedgerError(48, "NOT_IMPLEMENTED",
                              f"'{unsupported}=1' (ClickHouse's block compression) is not "
                              "supported by the ledger server: use Content-Encoding instead")
    read_only = method == "GET"
    if read_only and settings.get("readonly", "0") == "0":
        settings["readonly"] = "2"  # reads and settings only, as a server does for GET
    try:
        timeout = float(transport.get("session_timeout", DEFAULT_SESSION_TIMEOUT_S))
    except ValueError:
        raise LedgerError(36, "BAD_ARGUMENTS",
                          "session_timeout must be a number of seconds") from None
    if not 0 < timeout <= MAX_SESSION_TIMEOUT_S:
        raise LedgerError(36, "BAD_ARGUMENTS",
                          f"session_timeout must be in (0, {MAX_SESSION_TIMEOUT_S:.0f}]")
    return QueryRequest(
        query=query.encode(),
        database=transport.get("database") or None,
        default_format=transport.get("default_format") or DEFAULT_FORMAT,
        settings=settings,
        parameters=parameters,
        session_id=transport.get("session_id") or None,
        session_timeout_s=timeout,
        session_check=transport.get("session_check", "0") == "1",
        query_id=transport.get("query_id") or str(uuid.uuid4()),
        read_only=read_only,
    )


def credentials(headers: Mapping[str, str], fields: Mapping[str, str]) -> tuple[str, str]:
    """(user, password) from basic auth, the X-ClickHouse-User/Key headers or the URL."""
    authorization = headers.get("Authorization", "")
    if authorization.startswith("Basic "):
        try:
            decoded = base64.b64decode(authorization[len("Basic "):]).decode()
        except (ValueError, UnicodeDecodeError):
            raise LedgerError(516, "AUTHENTICATION_FAILED",
                              "malformed basic authorization") from None
        user, _, password = decoded.partition(":")
        return user or "default", password
    if "X-ClickHouse-User" in headers:
        return headers["X-ClickHouse-User"] or "default", headers.get("X-ClickHouse-Key", "")
    return fields.get("user") or "default", fields.get("password", "")


def _lz4() -> Any:
    import lz4.frame

    return lz4.frame.LZ4FrameDecompressor()


def _zstd() -> Any:
    try:
        from compression import zstd  # type: ignore[import-not-found]  # Python 3.14+
    except ImportError:
        from backports import zstd  # type: ignore[import-not-found,no-redef]
    return zstd.ZstdDecompressor()


_DECOMPRESSORS = {
    "gzip": lambda: zlib.decompressobj(16 + zlib.MAX_WBITS),
    "x-gzip": lambda: zlib.decompressobj(16 + zlib.MAX_WBITS),
    "deflate": lambda: zlib.decompressobj(zlib.MAX_WBITS),
    "zstd": _zstd,
    "lz4": _lz4,
}


def decompressed(chunks: Iterable[bytes], encoding: str | None) -> Iterator[bytes]:
    """The request body decoded per its Content-Encoding. Clients compress each block as its
    own frame (or gzip member), so a body may hold many: each ends, and the next begins."""
    encoding = (encoding or "").strip().lower()
    if encoding in ("", "identity"):
        yield from chunks
        return
    if encoding not in _DECOMPRESSORS:
        raise LedgerError(36, "BAD_ARGUMENTS",
                          f"Content-Encoding {encoding} is not supported: use gzip, deflate, "
                          "zstd or lz4")
    new = _DECOMPRESSORS[encoding]
    try:
        decoder = new()
        pending = False
        for chunk in chunks:
            data = chunk
            while data:
                out = decoder.decompress(data)
                pending = True
                if out:
                    yield out
                if decoder.eof:
                    data = decoder.unused_data
                    decoder = new()
                    pending = False
                else:
                    data = b""
    except LedgerError:
        raise
    except Exception as exc:  # noqa: BLE001 - each codec has its own error type
        raise LedgerError(271, "CANNOT_DECOMPRESS",
                          f"cannot decode the {encoding} request body: {exc}") from None
    if pending:
        raise LedgerError(271, "CANNOT_DECOMPRESS", f"the {encoding} request body is truncated")


def content_type(fmt: str | None) -> str:
    if fmt is None:
        return "text/plain; charset=UTF-8"
    return _CONTENT_TYPES.get(fmt, "application/octet-stream" if "Binary" in fmt
                              else "text/plain; charset=UTF-8")
