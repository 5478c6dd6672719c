"""Just enough of ClickHouse's lexer for the HTTP interface: where the inline data of an INSERT
begins, and which output format a query names.

The scanner works on bytes decoded as latin-1, so string offsets are byte offsets and binary
data after the statement cannot break it; keywords are ASCII either way.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_$]*")
_HEREDOC = re.compile(r"\$([A-Za-z0-9_]*)\$")
_OPEN = "([{"
_CLOSE = ")]}"
_SPACE = " \t\r\n\f\v"
# Statements whose answer is a result set, so the response names its format.
_RESULT_STATEMENTS = frozenset({"SELECT", "WITH", "SHOW", "DESCRIBE", "DESC", "EXISTS",
                                "EXPLAIN", "CHECK"})


@dataclass(frozen=True)
class Word:
    upper: str
    start: int
    end: int


@dataclass(frozen=True)
class InlineInsert:
    """An INSERT whose rows follow the statement in the request."""

    statement: bytes  # the INSERT up to its FORMAT clause
    input_format: str
    data_start: int  # offset of the first data byte in the scanned text


class NeedMore:
    """The scanned text ends before the answer is known: read more of the body."""


NEED_MORE = NeedMore()


def _skip_quoted(text: str, i: int, quote: str) -> int:
    """Index after the literal opening at `i`, or len(text) if the text ends inside it."""
    n = len(text)
    i += 1
    while i < n:
        c = text[i]
        if c == "\\":
            i += 2
        elif c == quote:
            if i + 1 < n and text[i + 1] == quote:  # a doubled quote is an escaped quote
                i += 2
            else:
                return i + 1
        else:
            i += 1
    return n


def _skip_block_comment(text: str, i: int) -> int:
    depth = 0
    n = len(text)
    while i < n:
        if text.startswith("/*", i):
            depth += 1
            i += 2
        elif text.startswith("*/", i):
            depth -= 1
            i += 2
            if depth == 0:
                return i
        else:
            i += 1
    return n


def top_level_words(text: str) -> Iterator[Word]:
    """The words outside literals, comments and brackets, in order."""
    depth = 0
    i = 0
    n = len(text)
    while i < n:
        c = text[i]
        if c in _SPACE:
            i += 1
        elif text.startswith("--", i) or (c == "#" and text[i + 1:i + 2] in (" ", "!")):
            newline = text.find("\n", i)
            i = n if newline < 0 else newline + 1
        elif text.startswith("/*", i):
            i = _skip_block_comment(text, i)
        elif c in "'`\"":
            i = _skip_quoted(text, i, c)
        elif c == "$" and (heredoc := _HEREDOC.match(text, i)):
            close = text.find(heredoc.group(0), heredoc.end())
            i = n if close < 0 else close + len(heredoc.group(0))
        elif c in _OPEN:
            depth += 1
            i += 1
        elif c in _CLOSE:
            depth = max(0, depth - 1)
            i += 1
        elif word := _WORD.match(text, i):
            if depth == 0:
                yield Word(word.group(0).upper(), word.start(), word.end())
            i = word.end()
        else:
            i += 1


def _data_start(text: str, after_format: int, complete: bool) -> int | NeedMore:
    """ClickHouse's rule: the data starts after spaces and at most one line break."""
    i = after_format
    n = len(text)
    while i < n and text[i] in " \t\f":
        i += 1
    if i < n and text[i] == "\r":
        i += 1
    if i < n and text[i] == "\n":
        i += 1
    if i == n and not complete:
        return NEED_MORE  # the line break may be in the next chunk
    return i


def split_inline_insert(head: bytes, complete: bool) -> InlineInsert | NeedMore | None:
    """The INSERT statement and its data's offset, if `head` (the start of the request's
    query text; `complete` when nothing follows) is an INSERT ... FORMAT carrying its rows;
    None for any other statement, including INSERT ... VALUES and INSERT ... SELECT."""
    text = head.decode("latin-1")
    words = top_level_words(text)
    for word in words:
        if word.end == len(text) and not complete:
            return NEED_MORE  # the word may continue in the next chunk
        if word.upper != "INSERT":
            return None
        break
    else:
        return None if complete else NEED_MORE
    for word in words:
        if word.end == len(text) and not complete:
            return NEED_MORE
        if word.upper in ("SELECT", "WITH", "VALUES"):
            # VALUES rows may hold bound parameters, which only the whole statement binds;
            # they are small, so the statement runs as one query.
            return None
        if word.upper == "FORMAT":
            name = next(words, None)
            if name is None or (name.end == len(text) and not complete):
                return None if complete else NEED_MORE
            start = _data_start(text, name.end, complete)
            if isinstance(start, NeedMore):
                return start
            return InlineInsert(head[:word.start], text[name.start:name.end], start)
    return None if complete else NEED_MORE


def output_format(query: bytes, formats: Mapping[str, str]) -> str | None:
    """The output format a query names in its FORMAT clause (canonical spelling from
    `formats`, keyed by lower-case name), or None."""
    named = None
    words = top_level_words(query.decode("latin-1"))
    for word in words:
        if word.upper == "FORMAT":
            following = next(words, None)
            if following is not None and following.upper.lower() in formats:
                named = formats[following.upper.lower()]
    return named


def returns_rows(query: bytes) -> bool:
    """Whether the statement answers with a result set (rather than only running)."""
    if query.lstrip().startswith(b"("):
        return True  # a parenthesised SELECT, or a UNION of them
    first = next(top_level_words(query.decode("latin-1")), None)
    return first is not None and first.upper in _RESULT_STATEMENTS
