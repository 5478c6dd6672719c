"""What the attribution processor checks a result against before paying for it: facts it can
see in the log, never claims the result makes about itself.

A result is paid only when all of these hold (`refusal` returns the first that does not):
- it is signed by the worker it names: the signature verifies against the first key
  registered for that worker id on `workers` (`WorkerRegistered`), so the compute operator
  credited is the worker that holds the key;
- it answers a request on `requests`: one with its request id, adapter id and prompt;
- its usage is the count of its token ids: prompt tokens = len(prompt_token_ids), completion
  tokens = len(output_token_ids), plus one when generation stopped on the stop token (charged,
  not carried); the ids themselves are bounded by the request: at most one token per byte of
  the prompt plus the start token (a byte-level tokenizer never makes more), and at most the
  request's max_new_tokens generated. (`loraledger verify` also re-tokenizes the prompt.)
- its request was not paid before, whatever the adapter: at most one attribution (and so one
  set of reward entries) per request id.

The state is built from the log (`requests`, `workers`, `attributions`) and survives a restart
by being read again; `attributions` is written in the same transaction as the payments, so
"already paid" is exactly the committed payments.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from schemas.events import (
    AttributionRecord,
    ChatMessage,
    InferenceRequest,
    InferenceResult,
    WorkerRegistered,
)
from schemas.signatures import signature_problem

# Special tokens the worker puts before a prompt's own tokens (the start token).
PROMPT_SPECIAL_TOKENS = 1


# A chat template wraps each message in role markers; the processor has no tokenizer to render
# it, so it allows this many bytes per message beyond the contents (`verify` re-tokenizes
# exactly).
CHAT_TEMPLATE_BYTES_PER_MESSAGE = 64


def prompt_sha256(prompt_input: str | Sequence[ChatMessage]) -> str:
    """The digest of what the model was asked: the prompt text, or the conversation's
    canonical JSON."""
    if isinstance(prompt_input, str):
        data = prompt_input.encode("utf-8")
    else:
        data = json.dumps([message.model_dump(mode="json") for message in prompt_input],
                          sort_keys=True, separators=(",", ":")).encode("utf-8")
    return hashlib.sha256(data).hexdigest()


def prompt_bytes_bound(request: InferenceRequest) -> int:
    """At most how many bytes the model's rendered input holds (each byte is at most a token)."""
    prompt_input = request.prompt_input
    if isinstance(prompt_input, str):
        return len(prompt_input.encode("utf-8"))
    contents = sum(len(message.content.encode("utf-8")) for message in prompt_input)
    return contents + CHAT_TEMPLATE_BYTES_PER_MESSAGE * (len(prompt_input) + 1)


@dataclass(frozen=True)
class RequestFacts:
    adapter_id: str | None  # None: the base model alone
    prompt_sha256: str
    prompt_bytes: int
    max_new_tokens: int

    @classmethod
    def of(cls, request: InferenceRequest) -> RequestFacts:
        return cls(
            adapter_id=request.adapter_id,
            prompt_sha256=prompt_sha256(request.prompt_input),
            prompt_bytes=prompt_bytes_bound(request),
            max_new_tokens=request.max_new_tokens,
        )


@dataclass
class Facts:
    """Requests by id (an id may be reused across adapters: each is kept), the first key of
    each worker, the request ids whose payment is committed (`settled`) and those paid in the
    open transaction (`pending`: forgotten when it ends, read back from `attributions` once
    committed)."""

    requests: dict[str, list[RequestFacts]] = field(default_factory=dict)
    worker_keys: dict[str, str] = field(default_factory=dict)
    settled: set[str] = field(default_factory=set)
    pending: set[str] = field(default_factory=set)

    def learn(self, event: Any) -> None:
        """Fold one event of `requests`, `workers` or `attributions` in."""
        if isinstance(event, InferenceRequest):
            known = self.requests.setdefault(event.request_id, [])
            facts = RequestFacts.of(event)
            if facts not in known:
                known.append(facts)
        elif isinstance(event, WorkerRegistered):
            self.worker_keys.setdefault(event.worker_id, event.public_key)
        elif isinstance(event, AttributionRecord):
            self.settled.add(event.request_id)


def usage_problem(result: InferenceResult, request: RequestFacts) -> str | None:
    prompt_ids, output_ids = len(result.prompt_token_ids), len(result.output_token_ids)
    if prompt_ids > request.prompt_bytes + PROMPT_SPECIAL_TOKENS:
        return (f"{prompt_ids} prompt token ids for a prompt of {request.prompt_bytes} bytes")
    if output_ids > request.max_new_tokens:
        return f"{output_ids} generated token ids, the request allows {request.max_new_tokens}"
    usage = result.usage
    stop_token = 1 if result.finish_reason == "stop" else 0
    if usage.prompt_tokens != prompt_ids or not (
        output_ids <= usage.completion_tokens <= min(output_ids + stop_token,
                                                      request.max_new_tokens)
    ):
        return (
            f"usage ({usage.prompt_tokens} prompt, {usage.completion_tokens} completion tokens) "
            f"does not recount from the token ids ({prompt_ids} prompt, {output_ids} generated)"
        )
    return None


def answered_request(result: InferenceResult, facts: Facts) -> RequestFacts | str:
    """The request `result` answers, or why there is none."""
    candidates = facts.requests.get(result.request_id)
    if not candidates:
        return f"no request {result.request_id} on `requests`"
    digest = prompt_sha256(result.prompt_input)
    for request in candidates:
        if request.adapter_id == result.adapter_id and request.prompt_sha256 == digest:
            return request
    return (f"the result does not answer request {result.request_id} "
            "(its adapter or prompt differ)")


def refusal(result: InferenceResult, payload: Mapping[str, Any], facts: Facts) -> str | None:
    """Why the ok result `result` (sent as the JSON object `payload`) is not paid; None when it
    is."""
    problem = signature_problem(payload, facts.worker_keys.get(result.worker_id))
    if problem is not None:
        return f"worker {result.worker_id} is not authenticated: {problem}"
    request = answered_request(result, facts)
    if isinstance(request, str):
        return request
    problem = usage_problem(result, request)
    if problem is not None:
        return problem
    if result.request_id in facts.settled or result.request_id in facts.pending:
        return f"request {result.request_id} is already paid"
    return None
