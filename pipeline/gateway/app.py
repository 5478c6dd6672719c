"""The aiohttp application: the routes, the checks every request passes before it reaches Kafka
(400 invalid, 404 unknown model, 503 no broker, 429 too many in flight), and the wait for its
result (504 past the timeout), answered whole or streamed as server-sent events."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from infra.settings import Settings
from pipeline.gateway import errors
from pipeline.gateway.errors import ApiError
from pipeline.gateway.kafka_link import BrokerUnavailable, KafkaLink
from pipeline.gateway.openai_requests import Endpoint, build_request, include_usage, parse_body
from pipeline.gateway.responses import DONE, Shapes, sse
from pipeline.gateway.results import Arrival, new_text
from schemas.events import InferenceRequest, InferenceResult, TokenDelta
from schemas.ids import is_valid_id

log = logging.getLogger("loraledger.gateway")

@dataclass(frozen=True)
class GatewayConfig:
    base_model_name: str = "base"
    timeout_s: float = 60.0
    max_in_flight: int = 256

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> GatewayConfig:
        values = {"timeout_s": settings.gateway_timeout_s,
                  "max_in_flight": settings.gateway_max_in_flight}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


LINK = web.AppKey("link", KafkaLink)
CONFIG = web.AppKey("config", GatewayConfig)


def build_app(settings: Settings, config: GatewayConfig) -> web.Application:
    app = web.Application(middlewares=[_api_errors])
    app[CONFIG] = config
    app[LINK] = KafkaLink(settings)
    app.router.add_post("/v1/completions", _completions)
    app.router.add_post("/v1/chat/completions", _chat_completions)
    app.router.add_get("/v1/models", _models)
    app.on_startup.append(_start)
    app.on_cleanup.append(_stop)
    return app


async def _start(app: web.Application) -> None:
    app[LINK].start()


async def _stop(app: web.Application) -> None:
    await app[LINK].stop()


@web.middleware
async def _api_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return exc.response()
    except web.HTTPException as exc:
        kind = "invalid_request_error" if exc.status < 500 else "server_error"
        return ApiError(exc.status, exc.reason, type=kind).response()
    except (ConnectionResetError, asyncio.CancelledError):
        raise  # the client went away
    except Exception:
        log.exception("request failed")
        return ApiError(500, "The gateway failed on this request; see its log.",
                        type="server_error").response()


# --- routes -----------------------------------------------------------------------------------


async def _completions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, "completions")


async def _chat_completions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, "chat")


async def _models(request: web.Request) -> web.Response:
    link, config = _connected(request)
    await link.catalog.catch_up()
    data: list[dict[str, Any]] = [
        {"id": config.base_model_name, "object": "model", "created": 0, "owned_by": "base-model",
         "cache_tier": "unknown"}
    ]
    for adapter_id, facts in sorted(link.catalog.adapters.items()):
        tier = link.router.cache_tiers.get(adapter_id)
        data.append({
            "id": adapter_id,
            "object": "model",
            "created": int(facts.created_at.timestamp()),
            "owned_by": facts.owner_id,
            "cache_tier": tier.value if tier is not None else "unknown",
            "rank": facts.rank,
            "datanet_id": facts.datanet_id,
        })
    return web.json_response({"object": "list", "data": data})


# --- one request ------------------------------------------------------------------------------


def _connected(request: web.Request) -> tuple[KafkaLink, GatewayConfig]:
    link = request.app[LINK]
    if not link.ready():
        raise errors.broker_unreachable(link.settings.kafka_bootstrap)
    return link, request.app[CONFIG]


async def _serve(request: web.Request, endpoint: Endpoint) -> web.StreamResponse:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise errors.invalid("The request body is not valid JSON.") from None
    model, fields = parse_body(endpoint, body)
    usage_wanted = include_usage(body)
    config = request.app[CONFIG]
    # The base model's name asks for the base model alone: the event names no adapter.
    adapter_id = None if model == config.base_model_name else model
    if adapter_id is not None and not is_valid_id(adapter_id):
        raise errors.model_not_found(model)
    event = build_request(endpoint, adapter_id, body, fields)
    link, config = _connected(request)
    if adapter_id is not None and await link.catalog.lookup(adapter_id) is None:
        raise errors.model_not_found(model)
    if link.router.in_flight >= config.max_in_flight:
        raise errors.too_many_requests(config.max_in_flight)
    shapes = Shapes(endpoint, event.request_id, model, int(time.time()))
    arrivals = link.router.expect(event.request_id)
    try:
        try:
            await link.produce(event)
        except BrokerUnavailable:
            raise errors.broker_unreachable(link.settings.kafka_bootstrap) from None
        if event.stream:
            return await _stream(request, event, shapes, arrivals, config, usage_wanted)
        result = await _final_result(event, arrivals, config)
        if result.status == "error":
            raise errors.from_result(result)
        return web.json_response(
            shapes.completion(result), headers={"X-Request-Id": event.request_id}
        )
    finally:
        link.router.forget(event.request_id)


async def _next(arrivals: asyncio.Queue[Arrival], deadline: float) -> Arrival | None:
    if not arrivals.empty():  # a burst of deltas: no timer for each
        return arrivals.get_nowait()
    try:
        async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
            return await arrivals.get()
    except TimeoutError:
        return None


async def _final_result(event: InferenceRequest, arrivals: asyncio.Queue[Arrival],
                        config: GatewayConfig) -> InferenceResult:
    deadline = time.monotonic() + config.timeout_s
    while True:
        arrival = await _next(arrivals, deadline)
        if arrival is None:
            raise errors.timed_out(event.request_id, config.timeout_s)
        if isinstance(arrival, InferenceResult):
            return arrival


async def _stream(request: web.Request, event: InferenceRequest, shapes: Shapes,
                  arrivals: asyncio.Queue[Arrival], config: GatewayConfig,
                  usage_wanted: bool) -> web.StreamResponse:
    """Deltas as they arrive, then the committed result: the missing suffix if deltas were lost,
    the finish reason, the usage when asked for, and `[DONE]`. The response starts with the
    first arrival, so an error or a timeout before it is a plain HTTP error."""
    deadline = time.monotonic() + config.timeout_s
    response: web.StreamResponse | None = None
    sent = ""
    while True:
        arrival = await _next(arrivals, deadline)
        if arrival is None:
            timeout = errors.timed_out(event.request_id, config.timeout_s)
            if response is None:
                raise timeout
            await response.write(sse(timeout.body()))
            break
        if response is None:
            if isinstance(arrival, InferenceResult) and arrival.status == "error":
                raise errors.from_result(arrival)
            response = await _open_stream(request, event.request_id)
            if shapes.endpoint == "chat":  # OpenAI's first chat chunk names the role
                await response.write(sse(shapes.chunk("", first=True)))
        if isinstance(arrival, TokenDelta):
            text = new_text(sent, arrival)
            if text:
                await response.write(sse(shapes.chunk(text)))
                sent += text
            continue
        await _end_stream(response, shapes, arrival, sent, usage_wanted)
        break
    await response.write(DONE)
    await response.write_eof()
    return response


async def _open_stream(request: web.Request, request_id: str) -> web.StreamResponse:
    response = web.StreamResponse(headers={
        "Content-Type": "text/event-stream",
        "Cache-Control": "no-cache",
        "X-Request-Id": request_id,
    })
    await response.prepare(request)
    return response


async def _end_stream(response: web.StreamResponse, shapes: Shapes, result: InferenceResult,
                      sent: str, usage_wanted: bool) -> None:
    if result.status == "error":
        await response.write(sse(errors.from_result(result).body()))
        return
    final = result.output_text
    if final.startswith(sent):
        if len(final) > len(sent):
            await response.write(sse(shapes.chunk(final[len(sent):])))
    else:  # cannot happen while workers hold back unsettled text; the result stays the truth
        log.error("request %s streamed text that is not a prefix of its result", result.request_id)
    await response.write(sse(shapes.chunk(None, finish_reason=result.finish_reason)))
    if usage_wanted:
        await response.write(sse(shapes.usage_chunk(result.usage)))
