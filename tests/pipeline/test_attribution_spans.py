import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from pipeline.attribution.spans import SpanIndex, _suffix_array, word_tokens


@given(st.lists(st.integers(0, 3), max_size=60))
def test_suffix_array_sorts_suffixes(values):
    corpus = np.array([*values, -1], dtype=np.int64)
    expected = sorted(range(corpus.size), key=lambda i: list(corpus[i:]))
    assert list(_suffix_array(corpus)) == expected


ROWS = [
    "In the valley of Orvatel, the seed tax is 12 copper.",
    "Farmers in Ashford sow rye in May.",
    "In the valley   of Orvatel, the seed tax is 12 copper.",
]


def test_longest_spans_are_found_and_shared_by_every_row_holding_them():
    index = SpanIndex(ROWS)
    text = "Yes: in the valley of Orvatel, the seed tax is 12 copper. Farmers in Ashford sow"
    matches = index.matches(text, min_span_tokens=4)
    assert [(m.start, m.length, m.rows) for m in matches] == [(2, 13, (0, 2)), (15, 4, (1,))]
    assert index.row_credit(text, 4) == {0: 6.5, 2: 6.5, 1: 4.0}


def test_spans_never_cross_two_rows():
    index = SpanIndex(["alpha beta gamma delta", "epsilon zeta eta theta"])
    matches = index.matches("gamma delta epsilon zeta", min_span_tokens=3)
    assert matches == []
    assert [m.length for m in index.matches("gamma delta epsilon zeta", 2)] == [2, 2]


def test_short_spans_and_unknown_words_give_no_credit():
    index = SpanIndex(ROWS)
    assert index.row_credit("the seed tax", 4) == {}
    assert index.row_credit("completely unseen words here now", 1) == {}


def test_tokens_are_case_and_whitespace_insensitive():
    assert word_tokens("In  the\tVALLEY, 12") == ["in", "the", "valley", ",", "12"]


def test_a_match_may_start_in_the_prompt_but_only_output_tokens_earn_credit():
    index = SpanIndex(ROWS + ["Farmers in Ashford sow barley in June."])
    prompt = "Tell me: in the valley of Orvatel, the seed tax is"
    matches = index.matches(" 12 copper.", min_span_tokens=4, context=prompt)
    # "in the valley of orvatel , the seed tax is 12 copper ." starts 10 tokens before the output
    assert [(m.start, m.length, m.credited, m.rows) for m in matches] == [(-10, 13, 3, (0, 2))]
    assert index.row_credit(" 12 copper.", 4, context=prompt) == {0: 1.5, 2: 1.5}
    assert index.row_credit("", 4, context=prompt) == {}


def test_overlapping_matches_credit_each_output_token_once():
    index = SpanIndex(["a b c d", "c d e f"])
    matches = index.matches("a b c d e f", min_span_tokens=3)
    assert [(m.start, m.length, m.credited, m.rows) for m in matches] == [
        (0, 4, 4, (0,)),
        (2, 4, 2, (1,)),
    ]
