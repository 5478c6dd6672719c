"""Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` with the HTTP
status the official clients turn into their typed exceptions."""

from __future__ import annotations

from dataclasses import dataclass, field

from aiohttp import web

from schemas.events import ErrorCode, InferenceResult


@dataclass
class ApiError(Exception):
    status: int
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message, "type": self.type, "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> web.Response:
        return web.json_response(self.body(), status=self.status, headers=self.headers)


def invalid(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code="invalid_value")


def model_not_found(model: str) -> ApiError:
    return ApiError(
        404,
        f"The model {model!r} does not exist: list the served models with GET /v1/models.",
        param="model",
        code="model_not_found",
    )


def broker_unreachable(bootstrap: str) -> ApiError:
    return ApiError(
        503,
        f"The Kafka broker at {bootstrap} is unreachable; retry once it is back.",
        type="service_unavailable",
        code="broker_unreachable",
        headers={"Retry-After": "1"},
    )


def too_many_requests(limit: int) -> ApiError:
    return ApiError(
        429,
        f"This gateway already holds {limit} requests in flight; retry shortly.",
        type="rate_limit_exceeded",
        code="too_many_requests",
        headers={"Retry-After": "1"},
    )


def timed_out(request_id: str, timeout_s: float) -> ApiError:
    return ApiError(
        504,
        f"No result for request {request_id} within {timeout_s:g} s; it may still be served "
        "and paid: look it up by this id.",
        type="timeout",
        code="timeout",
        headers={"X-Request-Id": request_id},
    )


_RESULT_ERRORS: dict[ErrorCode, tuple[int, str, str | None]] = {
    ErrorCode.UNKNOWN_ADAPTER: (404, "invalid_request_error", "model"),
    ErrorCode.ADAPTER_REFUSED: (400, "invalid_request_error", "model"),
    ErrorCode.PROMPT_TOO_LONG: (400, "invalid_request_error", "prompt"),
    ErrorCode.INVALID_PARAMETERS: (400, "invalid_request_error", None),
    ErrorCode.INTERNAL: (500, "server_error", None),
}


def from_result(result: InferenceResult) -> ApiError:
    """The error a worker's error result stands for."""
    code = result.error_code or ErrorCode.INTERNAL
    # A code this gateway does not know yet is about the request: the worker's own failures
    # are INTERNAL.
    status, kind, param = _RESULT_ERRORS.get(code, (400, "invalid_request_error", None))
    return ApiError(
        status,
        f"{result.error_message or code.value} (request {result.request_id})",
        type=kind,
        param=param,
        code=code.value,
        headers={"X-Request-Id": result.request_id},
    )
