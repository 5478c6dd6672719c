"""bytes <-> event. Values are UTF-8 JSON; a decode failure raises DecodeError with one line."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ValidationError

from schemas.topics import value_adapter


class DecodeError(ValueError):
    """A message that is not a valid event for its topic. `reason` is one line for a human."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def encode(event: BaseModel) -> bytes:
    return event.model_dump_json().encode("utf-8")


_SHOWN_ERRORS = 3


def validation_summary(exc: ValidationError, whole: str = "event") -> str:
    """The first few field errors on one line; `whole` names an error of no single field."""
    errors = exc.errors(include_url=False)
    parts = [
        f"{'.'.join(str(part) for part in error['loc']) or whole}: {error['msg']}"
        for error in errors[:_SHOWN_ERRORS]
    ]
    more = f" (+{len(errors) - _SHOWN_ERRORS} more)" if len(errors) > _SHOWN_ERRORS else ""
    return "; ".join(parts).replace("\n", " ") + more


def decode(topic: str, data: bytes | None) -> Any:
    """Decode a message value of logical topic `topic` into its event model."""
    if data is None:
        raise DecodeError("empty message value")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DecodeError(f"value is not UTF-8 (byte {exc.start})") from None
    try:
        payload = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DecodeError(
            f"value is not JSON: {exc.msg} at line {exc.lineno} col {exc.colno}"
        ) from None
    if not isinstance(payload, dict):
        raise DecodeError(f"value is JSON {type(payload).__name__}, expected an object")
    try:
        return value_adapter(topic).validate_python(payload)
    except ValidationError as exc:
        raise DecodeError(f"invalid {topic} event: {validation_summary(exc)}") from None
