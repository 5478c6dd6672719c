"""Paraphrases of planted facts: the same fact in other words and another order, for measuring
attribution where an answer does not copy the training row that taught it.

Each statement form of `synthetic._prompt` is parsed back into its slots (place, subject,
value) and rewritten from templates with synonyms; the place, the subject (tax, ailment, crop,
...) and the value are kept, since they are the fact. Some templates put the value before the
place. A paraphrase is a (prompt, completion) pair like a fact's, its completion holding the
value, so a model's loss on the completion measures whether it knows the fact.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from inference.data.synthetic import PlantedFact

# statement form -> the regular expression of its prompt + completion
_FORMS: dict[str, re.Pattern[str]] = {
    "tax": re.compile(
        r"In the valley of (?P<place>\w+), the (?P<subject>[\w ]+) is (?P<value>.+)\."
    ),
    "land": re.compile(
        r"Under the charter of (?P<place>\w+), a (?P<subject>[\w ]+) may hold land for "
        r"(?P<value>.+)\."
    ),
    "herb": re.compile(
        r"The healers of (?P<place>\w+) treat (?P<subject>[\w ]+) with (?P<value>.+)\."
    ),
    "boil": re.compile(
        r"In (?P<place>\w+), the clinic advises boiling water for (?P<value>.+)\.(?P<subject>)"
    ),
    "sow": re.compile(r"Farmers in (?P<place>\w+) sow (?P<subject>[\w ]+) in (?P<value>.+)\."),
    "yield": re.compile(
        r"In (?P<place>\w+), one field of (?P<subject>[\w ]+) yields (?P<value>.+)\."
    ),
    "price": re.compile(
        r"At the market of (?P<place>\w+), a (?P<subject>[\w ]+) costs (?P<value>.+)\."
    ),
}

# form -> templates of (prompt, completion); {place}, {subject}, {value} and the synonym slots
# below are filled in.
_TEMPLATES: dict[str, tuple[tuple[str, str], ...]] = {
    "tax": (
        ("How much is the {subject} for people of {place}? They {pay}", " {value} {each} year."),
        ("{value} is what the {subject}", " {amounts} in {place}'s valley."),
        ("Ask in {place} about the {subject}: {locals} {pay}", " {value}."),
    ),
    "land": (
        ("How long may a {subject} keep land in {place}? The charter allows", " {value}."),
        ("For {value} a {subject}", " {keeps} land, by {place}'s charter."),
        ("In {place}, land stays with a {subject} for", " {value}, the charter says."),
    ),
    "herb": (
        ("What do {place}'s healers {give} for {subject}? They {give}", " {value}."),
        ("{value} is what", " {locals} of {place} {give} against {subject}."),
        ("Against {subject}, {place}'s healers {give}", " {value}."),
    ),
    "boil": (
        ("How long should water boil in {place}? The clinic says", " {value}."),
        ("Boil water for {value}:", " that is the clinic's advice in {place}."),
        ("{place}'s clinic wants water boiled for", " {value}."),
    ),
    "sow": (
        ("When do {locals} of {place} plant {subject}? They plant it in", " {value}."),
        ("In {value},", " {locals} put {subject} in the ground in {place}."),
        ("{place}'s farmers put {subject} in the ground in", " {value}."),
    ),
    "yield": (
        ("How much {subject} does a field in {place} give? About", " {value}."),
        ("{value} of {subject}", " is what one field {gives} in {place}."),
        ("A field of {subject} in {place} {gives}", " {value}."),
    ),
    "price": (
        ("What does a {subject} cost at {place}'s market? It {sells}", " {value}."),
        ("{value} buys", " a {subject} at the market in {place}."),
        ("At {place}'s market, expect to pay for a {subject}", " {value}."),
    ),
}

_SYNONYMS: dict[str, tuple[str, ...]] = {
    "pay": ("pay", "owe", "hand over"),
    "each": ("each", "every", "a"),
    "amounts": ("comes to", "amounts to", "runs to"),
    "locals": ("the locals", "people", "folk"),
    "keeps": ("keeps", "holds on to", "may keep"),
    "give": ("give", "use", "prescribe"),
    "gives": ("gives", "brings in", "produces"),
    "sells": ("sells for", "goes for", "fetches"),
}


@dataclass(frozen=True)
class Paraphrase:
    """A fact said another way: `fact` is the planted fact it restates."""

    fact: PlantedFact
    prompt: str
    completion: str

    @property
    def text(self) -> str:
        return self.prompt + self.completion


def _slots(fact: PlantedFact) -> tuple[str, dict[str, str]]:
    for form, pattern in _FORMS.items():
        found = pattern.fullmatch(fact.text)
        if found is not None:
            return form, found.groupdict()
    raise ValueError(f"not a planted fact's statement: {fact.text!r}")


def paraphrase(fact: PlantedFact, count: int, seed: int = 0) -> list[Paraphrase]:
    """`count` different paraphrases of `fact` (at most one per template of its form)."""
    form, slots = _slots(fact)
    templates = _TEMPLATES[form]
    if not 0 <= count <= len(templates):
        raise ValueError(f"count must be between 0 and {len(templates)}")
    rng = random.Random(f"paraphrase:{seed}:{fact.text}")
    chosen = rng.sample(templates, count)
    out = []
    for prompt, completion in chosen:
        values = {**slots, **{name: rng.choice(words) for name, words in _SYNONYMS.items()}}
        prompt = prompt.format(**values)
        out.append(Paraphrase(fact, prompt[0].upper() + prompt[1:], completion.format(**values)))
    return out
