"""Identifier types. Their character sets make path traversal impossible: an id is one path
component that starts with a letter or digit and holds no slash, so `..` and `a/../b` are
refused."""

from __future__ import annotations

import re
import uuid
from typing import Annotated, NewType

from pydantic import AfterValidator, StringConstraints, WithJsonSchema

ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
HEX64_PATTERN = r"^[0-9a-f]{64}$"

_ID_RE = re.compile(ID_PATTERN)

ID_RULE = "use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit"


def is_valid_id(value: str) -> bool:
    return bool(_ID_RE.fullmatch(value))


def check_id(value: str, what: str = "id") -> str:
    """Return `value` if it is a valid id, else raise ValueError with a one-line reason."""
    if not is_valid_id(value):
        raise ValueError(f"invalid {what} {value[:140]!r}: {ID_RULE}")
    return value


_ID_JSON_SCHEMA = {"type": "string", "pattern": ID_PATTERN, "maxLength": 128}

EntityId = Annotated[str, AfterValidator(check_id), WithJsonSchema(_ID_JSON_SCHEMA)]

# An adapter id that has been validated. Only the boundary makes one: a pydantic field typed
# `AdapterId` (the wire format is a plain string, as for every EntityId), or `parse_adapter_id`
# for an id from anywhere else (a command-line argument). Inner layers (the engine, its adapter
# cache, the worker's scheduler) take this type and do not check it again.
_ValidAdapterId = NewType("AdapterId", str)
AdapterId = Annotated[_ValidAdapterId, AfterValidator(check_id), WithJsonSchema(_ID_JSON_SCHEMA)]
ContributorId = EntityId
DatanetId = EntityId
WorkerId = EntityId
Sha256Hex = Annotated[str, StringConstraints(pattern=HEX64_PATTERN)]


def parse_adapter_id(value: str) -> AdapterId:
    """`value` as an AdapterId; ValueError with a one-line reason if it is not a valid id."""
    return _ValidAdapterId(check_id(value, "adapter id"))


def new_id() -> str:
    return uuid.uuid4().hex
