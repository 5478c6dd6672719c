"""The span method: credit the rows whose text the generated output reuses verbatim.

Rows, prompt and output are cut into word tokens (after the same normalization that defines a
row's identity). A suffix array over all rows (each row ends in its own sentinel, so no match
ever crosses two rows) finds the longest run of tokens from any position that occurs in some
row. Output tokens are covered left to right by the match reaching furthest (a match may start
in the prompt: an answer that continues a training row reuses it even if the user typed the
row's beginning); a match covering `c` new output tokens, held by `r` rows, gives each row
`c / r`. Spans shorter than `min_span_tokens` are ignored: short phrases occur everywhere and
say nothing about where an answer came from. Prompt tokens alone earn nothing.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from schemas.text import normalize_text

_TOKEN = re.compile(r"\w+|[^\w\s]")
DEFAULT_MIN_SPAN_TOKENS = 4


def word_tokens(text: str) -> list[str]:
    return _TOKEN.findall(normalize_text(text).casefold())


@dataclass(frozen=True)
class SpanMatch:
    start: int  # token offset in the text (negative: the match starts in the context)
    length: int  # tokens of the whole match
    credited: int  # tokens of the text this match covers that no earlier match covered
    rows: tuple[int, ...]  # positions (in the index's row order) of every row holding the span


def _suffix_array(corpus: np.ndarray) -> np.ndarray:
    """Prefix doubling: O(n log^2 n) with numpy sorts, fine for datanet-sized corpora."""
    n = corpus.size
    rank = np.unique(corpus, return_inverse=True)[1].astype(np.int64)
    order = np.argsort(rank, kind="stable")
    step = 1
    while step < n:
        second = np.full(n, -1, dtype=np.int64)
        second[: n - step] = rank[step:]
        order = np.lexsort((second, rank))
        keys = np.stack([rank[order], second[order]], axis=1)
        changed = np.any(keys[1:] != keys[:-1], axis=1)
        new_rank = np.empty(n, dtype=np.int64)
        new_rank[order] = np.concatenate([[0], np.cumsum(changed)])
        rank = new_rank
        if rank.max() == n - 1:
            break
        step *= 2
    return order


class SpanIndex:
    """A suffix array over the token sequences of `texts` (one per row, in the given order)."""

    def __init__(self, texts: Sequence[str]) -> None:
        self._vocab: dict[str, int] = {}
        pieces: list[np.ndarray] = []
        owners: list[np.ndarray] = []
        # Sentinels are negative and distinct per row: they never equal a word or each other.
        for row, text in enumerate(texts):
            ids = [self._vocab.setdefault(token, len(self._vocab)) for token in word_tokens(text)]
            pieces.append(np.array([*ids, -1 - row], dtype=np.int64))
            owners.append(np.full(len(ids) + 1, row, dtype=np.int64))
        self.rows = len(texts)
        self._corpus = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
        self._owner = np.concatenate(owners) if owners else np.zeros(0, dtype=np.int64)
        self._suffixes = _suffix_array(self._corpus) if self._corpus.size else self._corpus

    def _narrow(self, lo: int, hi: int, depth: int, token: int) -> tuple[int, int]:
        """Within suffixes [lo, hi) that agree on `depth` tokens, those whose next is `token`."""
        corpus, suffixes = self._corpus, self._suffixes

        def at(i: int) -> int:
            position = suffixes[i] + depth
            return int(corpus[position]) if position < corpus.size else -(1 << 62)

        left, right = lo, hi
        while left < right:
            mid = (left + right) // 2
            if at(mid) < token:
                left = mid + 1
            else:
                right = mid
        start, right = left, hi
        while left < right:
            mid = (left + right) // 2
            if at(mid) <= token:
                left = mid + 1
            else:
                right = mid
        return start, left

    def longest_match(self, tokens: Sequence[int]) -> tuple[int, int, int]:
        """(length, lo, hi): the longest prefix of `tokens` found, and its suffix range."""
        lo, hi, length = 0, int(self._suffixes.size), 0
        for token in tokens:
            if token < 0:
                break
            new_lo, new_hi = self._narrow(lo, hi, length, token)
            if new_lo >= new_hi:
                break
            lo, hi, length = new_lo, new_hi, length + 1
        return length, lo, hi

    def matches(
        self, text: str, min_span_tokens: int = DEFAULT_MIN_SPAN_TOKENS, context: str = ""
    ) -> list[SpanMatch]:
        """Maximal matches covering the tokens of `text`, left to right, each of at least
        `min_span_tokens`. A match may start in `context` (the prompt) and run into `text`:
        an answer that continues a training row word for word reuses that row even when the
        user typed its beginning. Only tokens of `text` are credited, each to one match."""
        if min_span_tokens < 1:
            raise ValueError("min_span_tokens must be >= 1")
        context_ids = [self._vocab.get(token, -1) for token in word_tokens(context)]
        ids = context_ids + [self._vocab.get(token, -1) for token in word_tokens(text)]
        longest = [self.longest_match(ids[start:]) for start in range(len(ids))]
        longest_length = max((length for length, _, _ in longest), default=0)
        found: list[SpanMatch] = []
        position = len(context_ids)
        while position < len(ids):
            # Of the matches that cover `position`, the one reaching furthest (then the longest).
            best: int | None = None
            for start in range(position, max(-1, position - longest_length), -1):
                length = longest[start][0]
                if length >= min_span_tokens and start + length > position:
                    reach = start + length
                    if best is None or reach >= best + longest[best][0]:
                        best = start
            if best is None:
                position += 1
                continue
            length, lo, hi = longest[best]
            rows = np.unique(self._owner[self._suffixes[lo:hi]])
            reach = best + length
            found.append(
                SpanMatch(
                    best - len(context_ids),
                    length,
                    reach - position,
                    tuple(int(row) for row in rows),
                )
            )
            position = reach
        return found

    def row_credit(
        self, text: str, min_span_tokens: int = DEFAULT_MIN_SPAN_TOKENS, context: str = ""
    ) -> dict[int, float]:
        """Row position -> credited tokens of `text`: each match's newly covered tokens split
        equally among the rows holding the whole match."""
        credit: dict[int, float] = {}
        for match in self.matches(text, min_span_tokens, context):
            share = match.credited / len(match.rows)
            for row in match.rows:
                credit[row] = credit.get(row, 0.0) + share
        return credit
