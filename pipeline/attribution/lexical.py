"""The lexical method: credit the rows that state what the prompt and output say, in any words
order, by BM25 (Okapi, Lucene's idf).

Rows, prompt and output are cut into the span method's word tokens (`spans.word_tokens`),
keeping words only: punctuation carries no fact. A row's score for a result is the BM25 score
of the result's distinct words (prompt and output together: a paraphrase of a fact may name its
subject in the question and its value in the answer) against the row. Only rows holding at
least one word of the output are scored: words of the prompt alone say what was asked, not
where the answer came from. Of the `top_k` best rows, only those scoring at least
`MIN_RELATIVE_SCORE` of the best are credited: a row that states the output's fact shares its
rare words (names, numbers) and scores close to the best, while rows sharing only common words
(a template, a domain's vocabulary) score far below it and, summed over many rows, would
outweigh it. The span method needs a row's words in the row's order; this one credits a row
that states the output's fact in other words or another order.

The statistics (document frequencies, lengths) are those of the index's own rows, which the
index hash covers, so anyone holding the index recomputes the same scores.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import numpy as np

from pipeline.attribution.spans import word_tokens

BM25_K1 = 1.2  # term-frequency saturation
BM25_B = 0.75  # length normalization
MIN_RELATIVE_SCORE = 0.7  # of the best row's score, to be credited


def lexical_terms(text: str) -> list[str]:
    return [token for token in word_tokens(text) if token[0].isalnum() or token[0] == "_"]


class LexicalIndex:
    """Inverted lists of the word tokens of `texts` (one per row, in the given order)."""

    def __init__(self, texts: Sequence[str], k1: float = BM25_K1, b: float = BM25_B) -> None:
        self.rows = len(texts)
        self.k1, self.b = k1, b
        postings: dict[str, list[tuple[int, int]]] = {}
        lengths = np.zeros(self.rows, dtype=np.float64)
        for row, text in enumerate(texts):
            terms = lexical_terms(text)
            lengths[row] = len(terms)
            for term, count in sorted(Counter(terms).items()):
                postings.setdefault(term, []).append((row, count))
        average = float(lengths.mean()) if self.rows and lengths.sum() > 0 else 1.0
        self._norm = k1 * (1 - b + b * lengths / average)
        self._postings = {
            term: (
                np.array([row for row, _ in pairs], dtype=np.int64),
                np.array([count for _, count in pairs], dtype=np.float64),
            )
            for term, pairs in postings.items()
        }

    def idf(self, term: str) -> float:
        found = self._postings.get(term)
        frequency = 0 if found is None else found[0].size
        return math.log(1 + (self.rows - frequency + 0.5) / (frequency + 0.5))

    def scores(self, query: str) -> np.ndarray:
        """[rows] BM25 of the distinct words of `query`, summed in sorted order (the same
        float result everywhere)."""
        total = np.zeros(self.rows, dtype=np.float64)
        for term in sorted(set(lexical_terms(query))):
            found = self._postings.get(term)
            if found is None:
                continue
            rows, counts = found
            total[rows] += self.idf(term) * counts * (self.k1 + 1) / (counts + self._norm[rows])
        return total

    def row_scores(self, text: str, context: str = "") -> np.ndarray:
        """[rows] BM25 of context and text together, zero for rows sharing no word of `text`."""
        scores = self.scores(f"{context} {text}")
        holds_output = np.zeros(self.rows, dtype=bool)
        for term in set(lexical_terms(text)):
            found = self._postings.get(term)
            if found is not None:
                holds_output[found[0]] = True
        return np.where(holds_output, scores, 0.0)

    def row_credit(
        self,
        text: str,
        top_k: int,
        context: str = "",
        min_relative: float = MIN_RELATIVE_SCORE,
    ) -> dict[int, float]:
        """Row position -> BM25 score, for the rows among the `top_k` best (equal scores by row
        position) with a positive score of at least `min_relative` times the best."""
        scores = self.row_scores(text, context)
        order = np.lexsort((np.arange(self.rows), -scores))[:top_k]
        if order.size == 0:
            return {}
        floor = max(min_relative * scores[order[0]], np.nextafter(0.0, 1.0))
        return {int(row): float(scores[row]) for row in order if scores[row] >= floor}
