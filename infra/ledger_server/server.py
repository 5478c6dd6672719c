"""The ledger server's HTTP application: ClickHouse's interface over a `LedgerEngine`.

The event loop only moves bytes; every engine call runs in a thread pool, pulling the request
body from the loop as it goes, so an insert streams in constant memory and a long insert
leaves the other threads free for reads.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import signal
import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from aiohttp import BodyPartReader, StreamReader, web

from infra.ledger_server.engine import LedgerEngine
from infra.ledger_server.ownership import DirectoryInUse
from infra.ledger_server.protocol import (
    LedgerError,
    content_type,
    credentials,
    decompressed,
    parse_request,
)

log = logging.getLogger(__name__)

WORKER_THREADS = 32  # requests in flight at once; each holds its own engine handle
PING_ANSWER = "Ok.\n"


class LedgerServerError(RuntimeError):
    """The server cannot start; the message says why and what to do."""


@dataclass(frozen=True)
class _State:
    engine: LedgerEngine
    password: str
    executor: ThreadPoolExecutor
    display_name: str


_STATE = web.AppKey("state", _State)


def _body_chunks(content: StreamReader, loop: asyncio.AbstractEventLoop) -> Iterator[bytes]:
    """The request body, read from a worker thread one chunk at a time as the engine asks."""
    while True:
        chunk = asyncio.run_coroutine_threadsafe(content.readany(), loop).result()
        if not chunk:
            return
        yield chunk


async def _form_fields(request: web.Request) -> list[tuple[str, str]]:
    """The `query` and `param_<name>` fields of a multipart form (clients send long bound
    parameters this way)."""
    fields: list[tuple[str, str]] = []
    async for part in await request.multipart():
        if not isinstance(part, BodyPartReader) or part.filename is not None:
            raise LedgerError(48, "NOT_IMPLEMENTED", "external data (tables sent with the "
                                                     "query) is not supported by the ledger")
        fields.append((part.name or "", await part.text()))
    return fields


def _authenticate(state: _State, request: web.Request) -> None:
    if not state.password:
        return
    user, password = credentials(request.headers, request.query)
    if user != "default" or not hmac.compare_digest(password.encode(), state.password.encode()):
        raise LedgerError(516, "AUTHENTICATION_FAILED",
                          f"{user}: Authentication failed: password is incorrect, or there is "
                          "no user with such name")


def _error_response(state: _State, exc: LedgerError, query_id: str | None) -> web.Response:
    headers = {
        "X-ClickHouse-Exception-Code": str(exc.code),
        "X-ClickHouse-Server-Display-Name": state.display_name,
    }
    if query_id:
        headers["X-ClickHouse-Query-Id"] = query_id
    return web.Response(status=exc.http_status, text=exc.body(state.engine.version),
                        headers=headers, content_type="text/plain", charset="utf-8")


async def _query(request: web.Request) -> web.Response:
    state = request.app[_STATE]
    if request.method == "GET" and "query" not in request.query:
        return web.Response(text=PING_ANSWER)
    query_id = None
    try:
        _authenticate(state, request)
        fields = list(request.query.items())
        chunks: Iterator[bytes] = iter(())
        if request.method == "POST":
            if request.content_type == "multipart/form-data":
                fields += await _form_fields(request)
            else:
                chunks = _body_chunks(request.content, asyncio.get_running_loop())
        parsed = parse_request(request.method, fields)
        query_id = parsed.query_id
        body = decompressed(chunks, request.headers.get("Content-Encoding"))
        outcome = await asyncio.get_running_loop().run_in_executor(
            state.executor, state.engine.execute, parsed, body
        )
    except LedgerError as exc:
        return _error_response(state, exc, query_id)
    except Exception as exc:  # noqa: BLE001 - a bug here must still answer like a server
        log.exception("request failed")
        return _error_response(state, LedgerError(1001, "STD_EXCEPTION", repr(exc)), query_id)
    headers = {
        "X-ClickHouse-Query-Id": parsed.query_id,
        "X-ClickHouse-Summary": json.dumps(outcome.summary, separators=(",", ":")),
        "X-ClickHouse-Timezone": parsed.settings.get("session_timezone") or state.engine.timezone,
        "X-ClickHouse-Server-Display-Name": state.display_name,
        "Content-Type": content_type(outcome.fmt),
    }
    if outcome.fmt is not None:
        headers["X-ClickHouse-Format"] = outcome.fmt
    return web.Response(body=outcome.body, headers=headers)


async def _ping(request: web.Request) -> web.Response:
    return web.Response(text=PING_ANSWER)


async def _no_handler(request: web.Request) -> web.Response:
    return web.Response(status=404, text=f"There is no handle {request.path}\n")


def create_app(engine: LedgerEngine, password: str, executor: ThreadPoolExecutor
               ) -> web.Application:
    # The body is decoded in one place (`decompressed`), for every encoding clients send.
    app = web.Application(handler_args={"auto_decompress": False})
    app[_STATE] = _State(engine, password, executor, socket.gethostname())
    app.router.add_get("/ping", _ping)
    app.router.add_route("GET", "/", _query)
    app.router.add_route("POST", "/", _query)
    app.router.add_route("*", "/{tail:.*}", _no_handler)
    return app


async def _serve(engine: LedgerEngine, host: str, port: int, password: str) -> None:
    executor = ThreadPoolExecutor(max_workers=WORKER_THREADS, thread_name_prefix="ledger")
    runner = web.AppRunner(create_app(engine, password, executor), access_log=None,
                           handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except OSError as exc:
            raise LedgerServerError(
                f"cannot listen on {host}:{port} ({exc.strerror}): another process uses the "
                "port; stop it or set LORALEDGER_LEDGER_PORT"
            ) from None
        print(f"ledger: serving {engine.path} at http://{host}:{port}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for stop_signal in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(stop_signal, stop.set)
        await stop.wait()
    finally:
        await runner.cleanup()
        # Off the loop: a worker still streaming a body needs the loop to finish.
        await asyncio.to_thread(executor.shutdown, wait=True, cancel_futures=True)


def serve(path: Path, *, host: str, port: int, password: str) -> None:
    """Own the chdb directory `path` and serve it at http://host:port until SIGINT or
    SIGTERM. Raises DirectoryInUse if another process owns the directory."""
    try:
        engine = LedgerEngine(path, owner=f"the ledger server (pid {os.getpid()}) at "
                                          f"http://{host}:{port}")
    except DirectoryInUse:
        raise
    except Exception as exc:  # noqa: BLE001 - chdb's start-up errors carry no type of their own
        raise LedgerServerError(f"cannot open the embedded ClickHouse at {path}: {exc}") from None
    try:
        asyncio.run(_serve(engine, host, port, password))
    finally:
        engine.close()
