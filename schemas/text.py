"""Text normalization that defines a datanet row's identity."""

from __future__ import annotations

import hashlib
import re
import unicodedata

_WHITESPACE = re.compile(r"\s+")


def normalize_text(text: str) -> str:
    """NFC, trimmed, every run of whitespace collapsed to one space: the same content typed
    with different spacing is the same row."""
    return _WHITESPACE.sub(" ", unicodedata.normalize("NFC", text)).strip()


def row_id_for(text: str) -> str:
    """A row's id: sha256 of its normalized text, hex."""
    return hashlib.sha256(normalize_text(text).encode("utf-8")).hexdigest()
