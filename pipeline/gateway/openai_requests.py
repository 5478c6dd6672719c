"""OpenAI request bodies to InferenceRequest events, checked before anything reaches Kafka: an
invalid body is a 400 naming the parameter, and nothing is produced for it."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ValidationError

from pipeline.gateway.errors import ApiError, invalid
from schemas.events import InferenceRequest

Endpoint = Literal["completions", "chat"]

# InferenceRequest's field -> the OpenAI parameter a client set it with.
_PARAM_OF_FIELD = {
    "adapter_id": "model",
    "max_new_tokens": "max_tokens",
    "client_id": "user",
    "prompt": "prompt",
    "messages": "messages",
    "temperature": "temperature",
    "top_p": "top_p",
    "seed": "seed",
    "stop": "stop",
}
# Parameters that would change what is generated and that this gateway cannot honour.
_UNSUPPORTED_IF_SET = ("logprobs", "echo", "suffix", "tools", "functions", "logit_bias")
_ROLES = ("system", "user", "assistant")


def parse_body(endpoint: Endpoint, body: Any) -> tuple[str, dict[str, Any]]:
    """The requested model and the sampling parameters, as InferenceRequest fields."""
    if not isinstance(body, dict):
        raise invalid("The request body must be a JSON object.")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid("`model` is required: an adapter id or the base model's name.", "model")
    for name in _UNSUPPORTED_IF_SET:
        if body.get(name) not in (None, False, 0, [], {}):
            raise invalid(f"`{name}` is not supported by this server.", name)
    for name in ("n", "best_of"):
        if body.get(name) not in (None, 1):
            raise invalid(f"`{name}` must be 1: one completion per request.", name)
    fields: dict[str, Any] = {}
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        fields["max_new_tokens"] = _integer(max_tokens, "max_tokens")
    for name in ("temperature", "top_p"):
        if body.get(name) is not None:
            fields[name] = _number(body[name], name)
    if body.get("seed") is not None:
        fields["seed"] = _integer(body["seed"], "seed")
    stop = body.get("stop")
    if stop is not None:
        fields["stop"] = [stop] if isinstance(stop, str) else stop
    if body.get("user") is not None:
        fields["client_id"] = body["user"]
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise invalid("`stream` must be true or false.", "stream")
    fields["stream"] = stream
    return model, fields


def include_usage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise invalid("`stream_options` must be an object.", "stream_options")
    return bool(options.get("include_usage", False))


def completion_prompt(body: dict[str, Any]) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise invalid("`prompt` must be one string (token arrays and batches are not served).",
                      "prompt")
    return prompt


def chat_messages(body: dict[str, Any]) -> list[dict[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("`messages` must be a non-empty list of {role, content}.", "messages")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in _ROLES:
            raise invalid(f"messages[{i}].role must be one of {', '.join(_ROLES)}.",
                          f"messages[{i}].role")
        out.append({"role": message["role"], "content": _text_content(message.get("content"), i)})
    return out


def chat_request(adapter_id: str | None, messages: list[dict[str, str]],
                 fields: dict[str, Any]) -> InferenceRequest:
    """A conversation as a request event; the worker renders it with the checkpoint's chat
    template."""
    return InferenceRequest(adapter_id=adapter_id, messages=messages, **fields)


def completion_request(adapter_id: str | None, prompt: str,
                       fields: dict[str, Any]) -> InferenceRequest:
    return InferenceRequest(adapter_id=adapter_id, prompt=prompt, **fields)


def build_request(endpoint: Endpoint, adapter_id: str | None, body: dict[str, Any],
                  fields: dict[str, Any]) -> InferenceRequest:
    """The request event (for the base model alone when `adapter_id` is None), or a 400 naming
    the first parameter it refuses."""
    try:
        if endpoint == "chat":
            return chat_request(adapter_id, chat_messages(body), fields)
        return completion_request(adapter_id, completion_prompt(body), fields)
    except ValidationError as exc:
        raise _invalid_from(exc) from None


def _invalid_from(exc: ValidationError) -> ApiError:
    error = exc.errors()[0]
    field_name = str(error["loc"][0]) if error["loc"] else None
    param = _PARAM_OF_FIELD.get(field_name or "", field_name)
    return invalid(f"Invalid `{param}`: {error['msg']}.", param)


def _integer(value: Any, param: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(f"`{param}` must be an integer.", param)
    return value


def _number(value: Any, param: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise invalid(f"`{param}` must be a number.", param)
    return float(value)


def _text_content(content: Any, index: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
        for part in content
    ):
        return "".join(part["text"] for part in content)
    raise invalid(f"messages[{index}].content must be text.", f"messages[{index}].content")
