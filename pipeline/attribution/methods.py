"""The two attribution methods and how their results are mixed into contributor weights.

Gradient method: score every training example against the result's sketch with the index's
estimator (`ekfac-projected` or `trak`, see `inference.attribution_index`), keep the top-k,
and sum the *positive* scores per (contributor, datanet). A negative score means the example
pushed the model away from this answer: it is reported among the top examples' scores but
earns nothing.

Span method: the tokens of the output that repeat a training row verbatim, in the context of
the prompt (see `spans`), summed per (contributor, datanet).

Mixing and the fallback when there is no signal:
1. Each method's influence is normalized to shares summing to 1. With `gradient_weight_ppm`
   = g, the mix is g/1e6 * gradient + (1 - g/1e6) * span.
2. If a method with a non-zero weight found nothing (no positive score in the top-k, no span
   of `min_span_tokens`), the other method's shares are used alone; if the weighted methods
   found nothing, whichever method found anything is used.
3. If neither method found anything, the weights are proportional to each contributor's
   number of examples in the index: every one of them shaped the adapter, and the fee share
   meant for contributors is neither lost nor handed to nobody.
The record's method params say which of these happened (`basis`: mix, gradient, span,
example_counts), and its name says it too, from what ran (`method_name`). Then keys below
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
    SPAN = "span"
    EXAMPLE_COUNTS = "example_counts"


SPAN_METHOD = "span"
EXAMPLE_COUNTS_METHOD = "example-counts"
NO_METHOD = "none"  # a failed attribution: no method produced weights


def method_name(basis: Basis, estimator: str) -> str:
    """The name of the methods the weights came from; the gradient method is named by the
    estimator that scored the examples (the index's), e.g. `ekfac-projected+span` for a mix."""
    names = {
        Basis.MIX: f"{estimator}+{SPAN_METHOD}",
        Basis.GRADIENT: estimator,
        Basis.SPAN: SPAN_METHOD,
        Basis.EXAMPLE_COUNTS: EXAMPLE_COUNTS_METHOD,
    }
    return names[basis]


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
    influence: dict[ContributorKey, float] = {}
    credit = artifacts.span_index.row_credit(text, min_span_tokens, context=prompt)
    for row in sorted(credit):
        key = artifacts.keys[row]
        influence[key] = influence.get(key, 0.0) + credit[row]
    return influence


def _normalized(influence: Mapping[ContributorKey, float]) -> dict[ContributorKey, float]:
    total = sum(influence.values())
    return {key: value / total for key, value in sorted(influence.items())}


def mix_weights(
    gradient: Mapping[ContributorKey, float],
    span: Mapping[ContributorKey, float],
    example_counts: Mapping[ContributorKey, int],
    *,
    gradient_weight_ppm: int,
    min_weight_ppm: int,
) -> tuple[dict[ContributorKey, int], Basis]:
    """Contributor weights in ppm (summing to exactly PPM_TOTAL, zeros left out) and the basis
    they were computed on; see the module docstring for the rules."""
    if not 0 <= gradient_weight_ppm <= PPM_TOTAL:
        raise ValueError(f"gradient_weight_ppm must be within 0..{PPM_TOTAL}")
    gradient = {key: value for key, value in gradient.items() if value > 0}
    span = {key: value for key, value in span.items() if value > 0}
    gradient_weight = gradient_weight_ppm / PPM_TOTAL
    found_gradient = bool(gradient) and gradient_weight > 0
    found_span = bool(span) and gradient_weight < 1
    shares: dict[ContributorKey, float]
    if found_gradient and found_span:
        g, s = _normalized(gradient), _normalized(span)
        shares = {
            key: gradient_weight * g.get(key, 0.0) + (1 - gradient_weight) * s.get(key, 0.0)
            for key in sorted(g.keys() | s.keys())
        }
        basis = Basis.MIX
    elif found_gradient or (gradient and not found_span):
        shares, basis = _normalized(gradient), Basis.GRADIENT
    elif span:
        shares, basis = _normalized(span), Basis.SPAN
    else:
        counted = {key: float(count) for key, count in example_counts.items() if count > 0}
        if not counted:
            raise ValueError("the index has no examples: nobody to attribute to")
        shares, basis = _normalized(counted), Basis.EXAMPLE_COUNTS
    ppm = largest_remainder_ppm(apply_minimum(shares, min_weight_ppm))
    return {key: value for key, value in sorted(ppm.items()) if value > 0}, basis
