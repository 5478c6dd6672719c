"""bytes <-> event. Values are UTF-8 JSON; a decode failure raises DecodeError with one line.

Decoding is total: whatever bytes arrive, `decode` returns an event of the topic or raises
DecodeError, so a consumer can dead-letter the message and move on. Size and nesting depth are
checked before the JSON parser sees the value (on a deep array it raises RecursionError, which
no consumer expects); duplicate keys and NaN/Infinity while it parses; the range of every
number on the decoded event, where numbers that validation converted from strings are too.
Anything else that escapes validation still ends as a DecodeError, naming the exception.
"""

from __future__ import annotations

import json
import math
import re
import sys
from typing import Any

import numpy as np
from pydantic import BaseModel, ValidationError

from schemas.topics import value_adapter

# The producers' max_request_size: no event we write is larger.
MAX_VALUE_BYTES = 4 * 1024 * 1024
# The deepest event is three levels (a proposal's changes' adapter prices); the margin is for
# future events, the bound for the parser's stack.
MAX_NESTING = 16
# Integers fit 64 bits, signed or unsigned, as the ledger's columns and most JSON readers need.
MIN_INT = -(2**63)
MAX_INT = 2**64 - 1
_SHOWN_CHARS = 24
_MAX_REASON_CHARS = 1024


class DecodeError(ValueError):
    """A message that is not a valid event for its topic. `reason` is one line for a human."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def encode(event: BaseModel) -> bytes:
    return event.model_dump_json().encode("utf-8")


def _one_line(text: str, limit: int = _MAX_REASON_CHARS) -> str:
    """`text` without line breaks or other control characters, cut at `limit`."""
    flat = "".join(char if char.isprintable() else " " for char in text[: limit + 1])
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def _shown(literal: str) -> str:
    return _one_line(literal, _SHOWN_CHARS)


# --- parsing ----------------------------------------------------------------------------------

# A JSON string, or an unterminated one running to the end: matching every opening quote keeps
# the scan linear (a pattern that can fail at each quote rescans the rest of the value). On
# UTF-8 bytes, since no byte of a multi-byte character is a quote, backslash or bracket.
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*(?:"|\\?\Z)', re.DOTALL)
_NOT_BRACKETS = bytes(sorted(set(range(256)) - set(b"[]{}")))


def _nesting(data: bytes) -> int:
    """The deepest nesting of arrays and objects in UTF-8 JSON `data`, brackets inside strings
    aside."""
    if data.count(b"[") + data.count(b"{") <= MAX_NESTING:
        return 0  # too few brackets to nest too deep, wherever they are
    brackets = _STRING.sub(b"", data).translate(None, _NOT_BRACKETS)
    if not brackets:
        return 0
    codes = np.frombuffer(brackets, dtype=np.uint8)
    steps = ((codes == ord("[")) | (codes == ord("{"))).astype(np.int32) * 2 - 1
    return int(steps.cumsum().max())


def _refuse_constant(name: str) -> Any:
    raise DecodeError(f"{name} is not a JSON number")


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Two values for one key would be read differently by other parsers (first or last wins).
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise DecodeError(f"duplicate key {_shown(key)!r}")
            seen.add(key)
    return obj


# Numbers are parsed by the parser's own C code (a hook per number would cost more than the
# rest of decoding); their bounds are checked on the event, see `_check_numbers`.
_DECODER = json.JSONDecoder(parse_constant=_refuse_constant, object_pairs_hook=_object)


def parse_object(data: bytes | None) -> dict[str, Any]:
    """The JSON object in a message value, within the codec's limits; DecodeError otherwise.
    `decode` validates it into an event; a consumer that salvages part of an invalid event
    starts from it too."""
    if data is None:
        raise DecodeError("empty message value")
    if len(data) > MAX_VALUE_BYTES:
        raise DecodeError(f"value is {len(data)} bytes, over the limit of {MAX_VALUE_BYTES}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DecodeError(f"value is not UTF-8 (byte {exc.start})") from None
    depth = _nesting(data)
    if depth > MAX_NESTING:
        raise DecodeError(f"value nests {depth} levels deep, over the limit of {MAX_NESTING}")
    try:
        payload = _DECODER.decode(text)
    except DecodeError:
        raise  # from a hook: NaN, a duplicate key
    except json.JSONDecodeError as exc:
        raise DecodeError(
            f"value is not JSON: {exc.msg} (line {exc.lineno} col {exc.colno})"
        ) from None
    except ValueError:
        # The only other ValueError the parser raises: Python converts only so many digits.
        raise DecodeError(
            f"value holds an integer of more than {sys.get_int_max_str_digits()} digits"
        ) from None
    if not isinstance(payload, dict):
        raise DecodeError(f"value is JSON {type(payload).__name__}, expected an object")
    return payload


# --- validation -------------------------------------------------------------------------------

_SHOWN_ERRORS = 3


def validation_summary(exc: ValidationError, whole: str = "event") -> str:
    """The first few field errors on one line; `whole` names an error of no single field."""
    errors = exc.errors(include_url=False)
    parts = [
        f"{'.'.join(_shown(str(part)) for part in error['loc']) or whole}: {error['msg']}"
        for error in errors[:_SHOWN_ERRORS]
    ]
    more = f" (+{len(errors) - _SHOWN_ERRORS} more)" if len(errors) > _SHOWN_ERRORS else ""
    return "; ".join(parts) + more


def _check_numbers(event: BaseModel) -> None:
    """Every number in the event is finite and every integer fits 64 bits, also those that
    validation converted from strings ("1e999", a 4,000-digit "9…9"), which the parser's
    checks never saw."""
    pending: list[tuple[str, Any]] = [("", event)]
    while pending:
        path, value = pending.pop()
        if isinstance(value, BaseModel):
            pending.extend((f"{path}{name}.", item) for name, item in value.__dict__.items())
        elif isinstance(value, list | tuple):
            if value and set(map(type, value)) == {int}:
                # Token ids, thousands of them: bounded at C speed.
                if min(value) < MIN_INT or max(value) > MAX_INT:
                    raise DecodeError(f"{path[:-1]}: integer outside the 64-bit range")
            else:
                pending.extend((f"{path}{index}.", item) for index, item in enumerate(value))
        elif isinstance(value, dict):
            pending.extend((f"{path}{_shown(str(key))}.", item) for key, item in value.items())
        elif isinstance(value, bool):
            continue
        elif isinstance(value, int) and not MIN_INT <= value <= MAX_INT:
            raise DecodeError(f"{path[:-1]}: integer outside the 64-bit range")
        elif isinstance(value, float) and not math.isfinite(value):
            raise DecodeError(f"{path[:-1]}: number is not finite")


def decode(topic: str, data: bytes | None) -> Any:
    """Decode a message value of logical topic `topic` into its event model."""
    adapter = value_adapter(topic)
    try:
        event = adapter.validate_python(parse_object(data))
        _check_numbers(event)
        return event
    except DecodeError as exc:
        raise DecodeError(_one_line(exc.reason)) from None
    except ValidationError as exc:
        raise DecodeError(_one_line(f"invalid {topic} event: {validation_summary(exc)}")) from None
    except MemoryError:
        raise  # the process is short of memory, which is not the message's fault
    except Exception as exc:  # the last line of defence: a consumer must go on
        raise DecodeError(
            _one_line(f"undecodable {topic} value: {type(exc).__name__}: {exc}")
        ) from None
