"""The three attribution methods and how their results are mixed into contributor weights.

Gradient method: score every training example against the result's sketch with the index's
estimator (`ekfac-projected` or `trak`, see `inference.attribution_index`), keep the top-k,
and sum the *positive* scores per (contributor, datanet). A negative score means the example
pushed the model away from this answer: it is reported among the top examples' scores but
earns nothing.

Lexical method (method version 3 on): the BM25 scores of the rows that share words with the
prompt and output, among the top-k and close to the best (see `lexical`), summed per
(contributor, datanet): it credits a row that states the output's fact in other words or
another order.

Span method: the tokens of the output that repeat a training row verbatim, in the context of
the prompt (see `spans`), summed per (contributor, datanet).

Mixing and the fallback when there is no signal:
1. Each method's influence is normalized to shares summing to 1. With `lexical_weight_ppm` = l
   and `gradient_weight_ppm` = g (as fractions of 1e6), the method weights are l for lexical,
   (1 - l) g for gradient and (1 - l)(1 - g) for span, and the mix is the weighted sum of the
   shares of the methods with a non-zero weight that found something, the weights rescaled to
   sum to 1.
2. If no method with a non-zero weight found anything (no positive score in the top-k, no
   span of `min_span_tokens`), the first method in the order gradient, lexical, span that
   found anything is used alone.
3. If no method found anything, the weights are proportional to each contributor's number of
   examples in the index: every one of them shaped the adapter, and the fee share meant for
   contributors is neither lost nor handed to nobody.
The record's method params say which of these happened (`basis`: mix, gradient, lexical,
span, example_counts), and its name says it too, from what ran (`method_name`). Then keys below
`min_weight_ppm` are dropped (`ppm.apply_minimum`) and the rest is rounded to ppm summing to
exactly 1,000,000 (`ppm.largest_remainder_ppm`).
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum

import numpy as np

from pipeline.attribution.artifacts import AdapterArtifacts, ContributorKey
from pipeline.attribution.ppm import apply_minimum, largest_remainder_ppm
from schemas.events import PPM_TOTAL, ExampleScore


class Basis(StrEnum):
    """What the weights were computed from."""

    MIX = "mix"
    GRADIENT = "gradient"
    LEXICAL = "lexical"
    SPAN = "span"
    EXAMPLE_COUNTS = "example_counts"


SPAN_METHOD = "span"
LEXICAL_METHOD = "lexical"
# The order of the methods in a name and in the fallback.
METHODS = (Basis.GRADIENT, Basis.LEXICAL, Basis.SPAN)
EXAMPLE_COUNTS_METHOD = "example-counts"
NO_METHOD = "none"  # a failed attribution: no method produced weights


def method_name(used: tuple[Basis, ...], estimator: str) -> str:
    """The name of the methods the weights came from, joined by `+` in `METHODS` order; the
    gradient method is named by the estimator that scored the examples (the index's), e.g.
    `ekfac-projected+span` for a mix of the two."""
    names = {
        Basis.GRADIENT: estimator,
        Basis.LEXICAL: LEXICAL_METHOD,
        Basis.SPAN: SPAN_METHOD,
        Basis.EXAMPLE_COUNTS: EXAMPLE_COUNTS_METHOD,
    }
    return "+".join(names[method] for method in used)


def basis_of(used: tuple[Basis, ...]) -> Basis:
    return Basis.MIX if len(used) > 1 else used[0]


def top_examples(artifacts: AdapterArtifacts, query: np.ndarray, top_k: int) -> list[ExampleScore]:
    """The `top_k` highest-scoring examples, best first; equal scores by example index."""
    scores = artifacts.index.score(query).astype(np.float64)
    count = min(top_k, scores.size)
    order = np.lexsort((np.arange(scores.size), -scores))[:count]
    examples = artifacts.index.examples
    example_index = examples.column("example_index")
    return [
        ExampleScore(
            example_index=int(example_index[int(i)].as_py()),
            row_id=artifacts.row_ids[int(i)],
            contributor_id=artifacts.keys[int(i)][0],
            datanet_id=artifacts.keys[int(i)][1],
            score=float(scores[int(i)]),
        )
        for i in order
    ]


def gradient_influence(examples: list[ExampleScore]) -> dict[ContributorKey, float]:
    influence: dict[ContributorKey, float] = {}
    for example in examples:
        if example.score > 0:
            key = (example.contributor_id, example.datanet_id)
            influence[key] = influence.get(key, 0.0) + example.score
    return influence


def span_influence(
    artifacts: AdapterArtifacts, text: str, min_span_tokens: int, prompt: str = ""
) -> dict[ContributorKey, float]:
    credit = artifacts.span_index.row_credit(text, min_span_tokens, context=prompt)
    return _contributor_influence(artifacts, credit)


def lexical_influence(
    artifacts: AdapterArtifacts, text: str, top_k: int, prompt: str = ""
) -> dict[ContributorKey, float]:
    credit = artifacts.lexical_index.row_credit(text, top_k, context=prompt)
    return _contributor_influence(artifacts, credit)


def _contributor_influence(
    artifacts: AdapterArtifacts, credit: dict[int, float]
) -> dict[ContributorKey, float]:
    """Each index row's credit summed per contributor, rows in order (float sums are then
    the same on every machine)."""
    influence: dict[ContributorKey, float] = {}
    for row in sorted(credit):
        key = artifacts.keys[row]
        influence[key] = influence.get(key, 0.0) + credit[row]
    return influence


def method_weights(gradient_weight_ppm: int, lexical_weight_ppm: int) -> dict[Basis, float]:
    """Each method's weight in the mix, from the governance parameters."""
    for name, value in (("gradient", gradient_weight_ppm), ("lexical", lexical_weight_ppm)):
        if not 0 <= value <= PPM_TOTAL:
            raise ValueError(f"{name}_weight_ppm must be within 0..{PPM_TOTAL}")
    lexical = lexical_weight_ppm / PPM_TOTAL
    gradient = gradient_weight_ppm / PPM_TOTAL
    return {
        Basis.GRADIENT: (1 - lexical) * gradient,
        Basis.LEXICAL: lexical,
        Basis.SPAN: (1 - lexical) * (1 - gradient),
    }


def _normalized(influence: Mapping[ContributorKey, float]) -> dict[ContributorKey, float]:
    total = sum(influence.values())
    return {key: value / total for key, value in sorted(influence.items())}


def mix_weights(
    influence: Mapping[Basis, Mapping[ContributorKey, float]],
    weights: Mapping[Basis, float],
    example_counts: Mapping[ContributorKey, int],
    *,
    min_weight_ppm: int,
) -> tuple[dict[ContributorKey, int], tuple[Basis, ...]]:
    """Contributor weights in ppm (summing to exactly PPM_TOTAL, zeros left out) and the
    methods they were computed from (`METHODS` order, or `(EXAMPLE_COUNTS,)`), from each
    method's influence and weight (`method_weights`); see the module docstring for the rules."""
    found = {
        method: {key: value for key, value in influence.get(method, {}).items() if value > 0}
        for method in METHODS
    }
    used = tuple(m for m in METHODS if found[m] and weights.get(m, 0.0) > 0)
    if not used:
        used = next(((m,) for m in METHODS if found[m]), ())
    shares: dict[ContributorKey, float] = {}
    if used:
        weighted = tuple(m for m in METHODS if weights.get(m, 0.0) > 0)
        # Rescaled only when a weighted method is missing: the weights of all of them already
        # sum to 1, and dividing by a float sum of 1 +- rounding would change older records.
        total = sum(weights[m] for m in used) if len(used) > 1 and used != weighted else 1.0
        for method in used:
            weight = weights[method] / total if len(used) > 1 else 1.0
            for key, share in _normalized(found[method]).items():
                shares[key] = shares.get(key, 0.0) + weight * share
        shares = dict(sorted(shares.items()))
    else:
        counted = {key: float(count) for key, count in example_counts.items() if count > 0}
        if not counted:
            raise ValueError("the index has no examples: nobody to attribute to")
        shares, used = _normalized(counted), (Basis.EXAMPLE_COUNTS,)
    ppm = largest_remainder_ppm(apply_minimum(shares, min_weight_ppm))
    return {key: value for key, value in sorted(ppm.items()) if value > 0}, used
