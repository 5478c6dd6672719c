"""Text normalization that defines a datanet row's identity."""

from __future__ import annotations

import hashlib
import re
import unicodedata

# What `row_id_for` does to a text before hashing it, in order; datanets record it.
ROW_ID_NORMALIZATION = "drop-format+nfkc+strip+collapse-whitespace"

_WHITESPACE = re.compile(r"\s+")


def normalize_text(text: str) -> str:
    """NFC, trimmed, every run of whitespace collapsed to one space: the form a row's text is
    kept and matched in."""
    return _WHITESPACE.sub(" ", unicodedata.normalize("NFC", text)).strip()


def identity_text(text: str) -> str:
    """The text a row's id hashes: format characters (Unicode category Cf: zero-width spaces
    and joiners, soft hyphens, direction marks) dropped, then NFKC, which folds compatibility
    forms (full-width letters, ligatures, superscripts) into their plain characters, then
    trimmed and whitespace collapsed. Text that differs only in invisible characters or
    compatibility forms is one row; scripts are not folded into each other (a Cyrillic "а"
    stays distinct from a Latin "a"), since that would merge texts that differ."""
    visible = "".join(char for char in text if unicodedata.category(char) != "Cf")
    return _WHITESPACE.sub(" ", unicodedata.normalize("NFKC", visible)).strip()


def row_id_for(text: str) -> str:
    """A row's id: sha256 of its identity text, hex."""
    return hashlib.sha256(identity_text(text).encode("utf-8")).hexdigest()
