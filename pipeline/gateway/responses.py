"""Response bodies and server-sent-event chunks in OpenAI's shapes, for both endpoints."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pipeline.gateway.openai_requests import Endpoint
from schemas.events import InferenceResult, Usage

DONE = b"data: [DONE]\n\n"


def usage_body(usage: Usage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


def sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


@dataclass(frozen=True)
class Shapes:
    """The bodies of one request's answer: its id, model and creation time are shared by every
    chunk of a stream."""

    endpoint: Endpoint
    request_id: str
    model: str
    created: int

    @property
    def id(self) -> str:
        prefix = "chatcmpl" if self.endpoint == "chat" else "cmpl"
        return f"{prefix}-{self.request_id}"

    def _envelope(self, kind: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "choices": choices}

    def completion(self, result: InferenceResult) -> dict[str, Any]:
        if self.endpoint == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": result.output_text},
                      "finish_reason": result.finish_reason, "logprobs": None}
            body = self._envelope("chat.completion", [choice])
        else:
            choice = {"index": 0, "text": result.output_text, "logprobs": None,
                      "finish_reason": result.finish_reason}
            body = self._envelope("text_completion", [choice])
        body["usage"] = usage_body(result.usage)
        return body

    def chunk(self, text: str | None, finish_reason: str | None = None,
              first: bool = False) -> dict[str, Any]:
        """One streamed piece of text (or, with `finish_reason`, the end of the choice)."""
        if self.endpoint == "chat":
            delta: dict[str, Any] = {"role": "assistant"} if first else {}
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason,
                      "logprobs": None}
            return self._envelope("chat.completion.chunk", [choice])
        choice = {"index": 0, "text": text or "", "logprobs": None,
                  "finish_reason": finish_reason}
        return self._envelope("text_completion", [choice])

    def usage_chunk(self, usage: Usage) -> dict[str, Any]:
        kind = "chat.completion.chunk" if self.endpoint == "chat" else "text_completion"
        body = self._envelope(kind, [])
        body["usage"] = usage_body(usage)
        return body
