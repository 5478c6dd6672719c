"""From an InferenceRequest and what the engine made of it to the InferenceResult event."""

from __future__ import annotations

from inference.engine import GenerationResult
from schemas.events import (
    ErrorCode,
    InferenceRequest,
    InferenceResult,
    Sketch,
    Timings,
)

MAX_ERROR_MESSAGE = 1024


def _with_wait(timings: Timings | None, waited_ms: float) -> Timings | None:
    """Add the time the request spent in the worker's queue before the engine saw it."""
    if timings is None:
        return None
    return timings.model_copy(
        update={
            "queue_ms": timings.queue_ms + waited_ms,
            "total_ms": timings.total_ms + waited_ms,
        }
    )


def ok_result(
    request: InferenceRequest,
    generation: GenerationResult,
    *,
    worker_id: str,
    base_model_hash: str | None,
    waited_ms: float = 0.0,
    sketch: Sketch | None = None,
) -> InferenceResult:
    g = generation
    return InferenceResult(
        request_id=request.request_id,
        adapter_id=request.adapter_id,
        status="ok",
        prompt=request.prompt or "",
        messages=request.messages,
        output_text=g.output_text or "",
        prompt_token_ids=list(g.prompt_ids),
        output_token_ids=list(g.output_ids),
        finish_reason=g.finish_reason,
        usage=g.usage,
        timings=_with_wait(g.timings, waited_ms),
        cache_tier=g.cache_tier,
        adapter_hash=g.adapter_version,
        base_model_hash=base_model_hash,
        worker_id=worker_id,
        sketch=sketch,
    )


def error_result(
    request: InferenceRequest,
    code: ErrorCode,
    message: str,
    *,
    worker_id: str,
    base_model_hash: str | None,
    timings: Timings | None = None,
    waited_ms: float = 0.0,
) -> InferenceResult:
    first_line = (message.splitlines() or [code.value])[0]
    return InferenceResult(
        request_id=request.request_id,
        adapter_id=request.adapter_id,
        status="error",
        error_code=code,
        error_message=first_line[:MAX_ERROR_MESSAGE],
        prompt=request.prompt or "",
        messages=request.messages,
        timings=_with_wait(timings, waited_ms),
        base_model_hash=base_model_hash,
        worker_id=worker_id,
    )
