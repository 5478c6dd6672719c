from __future__ import annotations

import pytest

from inference.data import general_corpus, generate_datanet, paraphrase
from inference.tokenizer import train_tokenizer


def test_same_seed_same_datanet_and_other_seed_differs() -> None:
    first = generate_datanet(seed=3, contributors=5)
    assert first == generate_datanet(seed=3, contributors=5)
    assert [r.text for r in first.rows] != [
        r.text for r in generate_datanet(seed=4, contributors=5).rows
    ]


def test_planted_facts_are_ground_truth_unique_to_their_contributor() -> None:
    datanet = generate_datanet(contributors=10, facts_per_contributor=3, variants_per_fact=2)
    by_contributor = datanet.facts_by_contributor()
    assert sorted(by_contributor) == datanet.contributors
    assert all(len(facts) == 3 for facts in by_contributor.values())
    places = [fact.place for fact in datanet.facts]
    assert len(set(places)) == len(places)
    for fact in datanet.facts:
        assert fact.completion.startswith(" ")
        holders = {row.contributor_id for row in datanet.rows if fact.place in row.text}
        assert holders == {fact.contributor_id}
        assert sum(fact.text in row.text for row in datanet.rows) == 2  # two phrasings


def test_general_corpus_never_mentions_a_planted_place() -> None:
    datanet = generate_datanet(contributors=20)
    corpus = " ".join(general_corpus(documents=2000))
    for fact in datanet.facts:
        assert f" {fact.place}," not in corpus and f" {fact.place} " not in corpus


def test_prompt_and_completion_tokenize_like_the_whole_text() -> None:
    tokenizer = train_tokenizer(general_corpus(documents=300), vocab_size=400)
    for fact in generate_datanet(contributors=4).facts:
        whole = tokenizer(fact.text, add_special_tokens=False)["input_ids"]
        parts = (
            tokenizer(fact.prompt, add_special_tokens=False)["input_ids"]
            + tokenizer(fact.completion, add_special_tokens=False)["input_ids"]
        )
        assert whole == parts


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown domain"):
        generate_datanet(domains=("astrology",))
    with pytest.raises(ValueError, match="contributors"):
        generate_datanet(contributors=0)


def test_paraphrases_keep_a_facts_place_and_value_in_other_words():
    facts = generate_datanet(seed=1, contributors=12, facts_per_contributor=4).facts
    for fact in facts:
        paraphrases = paraphrase(fact, 2, seed=0)
        assert paraphrases == paraphrase(fact, 2, seed=0)
        assert len({p.text for p in paraphrases}) == 2
        value = fact.completion.strip().rstrip(".")
        for p in paraphrases:
            assert p.fact == fact
            assert fact.place in p.text and value.casefold() in p.text.casefold()
            assert fact.prompt not in p.text and p.completion.startswith(" ")
