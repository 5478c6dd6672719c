import math

import numpy as np
import pytest
from attribution_support import make_adapter, make_result

from pipeline.attribution.artifacts import ArtifactCache
from pipeline.attribution.attributor import MethodVersion, attribute
from pipeline.attribution.lexical import BM25_B, BM25_K1, MIN_RELATIVE_SCORE, LexicalIndex
from pipeline.attribution.methods import Basis
from pipeline.attribution.spans import SpanIndex
from schemas.events import PPM_TOTAL, Parameters

ROWS = [
    "In the valley of Tello, the market fee is 5 copper.",
    "In the valley of Orva, the seed tax is 9 silver.",
    "Farmers in Vata sow beans in November.",
    "The market fee is paid at dawn.",
]
# Rows 0's fact in other words and another order: no four-token run of any row.
PROMPT = "Ask in Tello about the market fee: people hand over"
OUTPUT = " 5 copper every year."
LEXICAL_ONLY = Parameters(lexical_weight_ppm=PPM_TOTAL, gradient_weight_ppm=0)


def test_scores_are_okapi_bm25_of_the_distinct_query_words():
    index = LexicalIndex(ROWS)
    lengths = [11, 11, 7, 7]  # words, punctuation left out
    average = sum(lengths) / len(lengths)

    def term(frequency: int, rows_holding: int, length: int) -> float:
        idf = math.log(1 + (len(ROWS) - rows_holding + 0.5) / (rows_holding + 0.5))
        norm = BM25_K1 * (1 - BM25_B + BM25_B * length / average)
        return idf * frequency * (BM25_K1 + 1) / (frequency + norm)

    scores = index.scores("Tello market, market copper?")
    expected_row_0 = term(1, 1, 11) + term(1, 2, 11) + term(1, 1, 11)
    assert scores[0] == pytest.approx(expected_row_0)
    assert scores[3] == pytest.approx(term(1, 2, 7))
    assert scores[1] == scores[2] == 0.0


def test_a_paraphrased_fact_is_credited_to_the_row_stating_it_where_spans_find_nothing():
    assert SpanIndex(ROWS).row_credit(OUTPUT, context=PROMPT) == {}
    credit = LexicalIndex(ROWS).row_credit(OUTPUT, top_k=2, context=PROMPT)
    assert list(credit) == [0]


def test_words_of_the_prompt_alone_credit_no_row():
    index = LexicalIndex(ROWS)
    assert index.row_credit(" I could not say.", top_k=4, context=PROMPT) == {}
    # Row 3 shares "market fee" with the prompt but no word of the output.
    assert index.row_scores(OUTPUT, context=PROMPT)[3] == 0.0
    assert index.scores(PROMPT + OUTPUT)[3] > 0


def test_top_k_keeps_the_best_rows_with_ties_by_position():
    credit = LexicalIndex(["a b", "a b", "a c", "d"]).row_credit("a b", top_k=2)
    assert list(credit) == [0, 1]


def test_rows_far_below_the_best_are_not_credited():
    index = LexicalIndex(ROWS)
    output = " 5 copper, as in every valley."
    scores = index.row_scores(output, context=PROMPT)
    assert 0 < scores[1] < 0.7 * scores[0]  # shares "in" and "valley": words, not the fact
    assert list(index.row_credit(output, top_k=4, context=PROMPT, min_relative=0.0)) == [0, 1, 2]
    assert list(index.row_credit(output, top_k=4, context=PROMPT)) == [0]


@pytest.fixture
def adapter(tmp_path):
    return make_adapter(tmp_path)


def paraphrased(adapter):
    # make_adapter's contributor 0 states "In the valley of Orvatel, the seed tax is 12 copper."
    return make_result(adapter, output_text=" 12 copper every year.").model_copy(
        update={"prompt": "How much is the seed tax for people of Orvatel? They pay"}
    )


def test_the_processor_credits_the_contributor_whose_row_states_the_paraphrased_fact(
    adapter, tmp_path
):
    cache = ArtifactCache(tmp_path)
    record = attribute(paraphrased(adapter), LEXICAL_ONLY, cache)
    assert (record.method.name, record.method.params["basis"]) == ("lexical", Basis.LEXICAL)
    assert [(w.contributor_id, w.ppm) for w in record.contributor_weights] == [
        ("contributor-000", PPM_TOTAL)
    ]
    assert record.method.params["lexical_weight_ppm"] == PPM_TOTAL
    params = record.method.params
    assert (params["bm25_k1"], params["bm25_b"]) == (BM25_K1, BM25_B)
    assert params["lexical_min_relative"] == MIN_RELATIVE_SCORE


def test_the_lexical_weight_is_pinned_by_the_evidence_and_absent_before_version_3(
    adapter, tmp_path
):
    cache = ArtifactCache(tmp_path)
    result = paraphrased(adapter)
    weighted = attribute(result, Parameters(lexical_weight_ppm=400_000), cache)
    other = attribute(result, Parameters(lexical_weight_ppm=600_000), cache)
    assert weighted.evidence_hash != other.evidence_hash
    assert weighted.contributor_weights != other.contributor_weights
    version_2 = attribute(result, Parameters(lexical_weight_ppm=400_000), cache, MethodVersion.V2)
    assert "lexical_weight_ppm" not in version_2.method.params
    assert "lexical" not in version_2.method.name
    assert version_2.contributor_weights == attribute(
        result, Parameters(lexical_weight_ppm=0), cache, MethodVersion.V2
    ).contributor_weights


def test_the_lexical_index_is_built_from_the_index_rows(adapter, tmp_path):
    artifacts = ArtifactCache(tmp_path).get("adapter-a")
    rows = [example.text for example in adapter["examples"]]
    expected = LexicalIndex(rows).row_scores(" 12 copper.", context="Orvatel")
    assert np.array_equal(artifacts.lexical_index.row_scores(" 12 copper.", "Orvatel"), expected)
