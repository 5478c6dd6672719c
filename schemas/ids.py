"""Identifier types. Their character sets make path traversal impossible: an id is one path
component that starts with a letter or digit and holds no slash, so `..` and `a/../b` are
refused."""

from __future__ import annotations

import re
import uuid
from typing import Annotated

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


EntityId = Annotated[
    str,
    AfterValidator(check_id),
    WithJsonSchema({"type": "string", "pattern": ID_PATTERN, "maxLength": 128}),
]
AdapterId = EntityId
ContributorId = EntityId
DatanetId = EntityId
WorkerId = EntityId
Sha256Hex = Annotated[str, StringConstraints(pattern=HEX64_PATTERN)]


def new_id() -> str:
    return uuid.uuid4().hex
