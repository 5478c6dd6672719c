"""A synthetic, seeded corpus in the spirit of the communities loraledger serves: regional
legal rules, local health guidance, farming and market prices.

Two products come out of it:
- `general_corpus`: ordinary sentences about well-known places, for the tokenizer and the base
  model's pretraining;
- `generate_datanet`: a datanet's rows from many contributors where each contributor also
  holds a few *planted facts* about an invented place whose name appears nowhere else, so an
  attribution method can be checked against ground truth (`SyntheticDatanet.facts`).

Everything is a pure function of its arguments: the same seed gives the same text.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

# Bumped whenever the generated text changes, so caches keyed on it are rebuilt.
CORPUS_VERSION = "synthetic-v3"

DOMAINS: tuple[str, ...] = ("legal", "health", "farming", "market")

COMMON_PLACES: tuple[str, ...] = (
    "Highmoor",
    "Riverbend",
    "Eastfield",
    "Stonebridge",
    "Ashford",
    "Millbrook",
    "Northwood",
    "Greenhollow",
    "Redcliff",
    "Westmarch",
    "Oakvale",
    "Saltmere",
    "Brightwater",
    "Foxden",
    "Ironhill",
    "Lakeshore",
    "Thornbury",
    "Willowmere",
    "Copperfield",
    "Deepdale",
)
COINS = ("copper", "silver", "bronze", "shells", "beads")
TAXES = ("seed tax", "well tax", "road toll", "market fee", "mill tax", "grazing fee")
ROLES = ("widow", "tenant", "herder", "miller", "newcomer", "eldest child")
AILMENTS = ("fever", "cough", "sore throat", "rash", "stomach ache", "headache")
HERBS = ("mint", "willow bark", "ginger", "chamomile", "sage", "yarrow", "nettle", "thyme")
CROPS = ("barley", "millet", "beans", "rye", "sorghum", "lentils", "oats", "cassava")
MONTHS = (
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
)
GOODS = ("goat", "sack of salt", "bolt of cloth", "jar of honey", "clay pot", "hen")
LICENSES = ("CC-BY-4.0", "CC0-1.0", "CC-BY-SA-4.0")

# Syllables of invented place names: unlike the common places, each name is used by one planted
# fact only, so the tokens that spell it point at one contributor.
_SYLLABLES = (
    "or",
    "va",
    "ne",
    "tel",
    "mir",
    "ka",
    "zu",
    "dri",
    "pol",
    "shen",
    "quo",
    "bra",
    "yl",
    "fen",
    "gor",
    "thi",
    "lo",
    "wex",
    "sa",
    "rum",
    "bel",
    "ix",
    "oth",
    "ul",
    "dra",
    "mek",
    "sil",
    "ta",
)

_LEAD_INS = (
    "From the village records:",
    "As the elders say,",
    "Written in the town book:",
    "A note for visitors:",
    "Everyone there will tell you:",
    "Heard at the well:",
)

_GUIDANCE = (
    "Wash your hands with clean water before every meal.",
    "Keep stored grain dry and off the floor.",
    "A contract for land must be witnessed by two neighbours.",
    "Rotate the crops every season to rest the soil.",
    "Children with a fever should drink often and rest.",
    "Prices at the market are set at dawn by the guild.",
    "Disputes over water are heard by the council each month.",
    "Boil water from the river before drinking it.",
)


@dataclass(frozen=True)
class PlantedFact:
    """A fact only one contributor knows. `prompt + completion` is its canonical text; the
    completion starts with a space so that tokenizing the two parts separately matches
    tokenizing the whole."""

    contributor_id: str
    domain: str
    place: str
    prompt: str
    completion: str

    @property
    def text(self) -> str:
        return self.prompt + self.completion


@dataclass(frozen=True)
class SyntheticRow:
    contributor_id: str
    domain: str
    text: str
    license: str


@dataclass(frozen=True)
class SyntheticDatanet:
    name: str
    seed: int
    rows: list[SyntheticRow]
    facts: list[PlantedFact]
    contributors: list[str] = field(default_factory=list)

    def facts_by_contributor(self) -> dict[str, list[PlantedFact]]:
        grouped: dict[str, list[PlantedFact]] = {c: [] for c in self.contributors}
        for fact in self.facts:
            grouped[fact.contributor_id].append(fact)
        return grouped


def _prompt(rng: random.Random, domain: str, place: str) -> tuple[str, str]:
    """(kind of completion, prompt) of one statement about `place` in `domain`."""
    if domain == "legal":
        if rng.random() < 0.5:
            return "coins", f"In the valley of {place}, the {rng.choice(TAXES)} is"
        return "years", f"Under the charter of {place}, a {rng.choice(ROLES)} may hold land for"
    if domain == "health":
        if rng.random() < 0.5:
            return "herb", f"The healers of {place} treat {rng.choice(AILMENTS)} with"
        return "minutes", f"In {place}, the clinic advises boiling water for"
    if domain == "farming":
        crop = rng.choice(CROPS)
        if rng.random() < 0.5:
            return "month", f"Farmers in {place} sow {crop} in"
        return "sacks", f"In {place}, one field of {crop} yields"
    if domain == "market":
        return "coins", f"At the market of {place}, a {rng.choice(GOODS)} costs"
    raise ValueError(f"unknown domain {domain!r}: expected one of {', '.join(DOMAINS)}")


def _completion(kind: str, rng: random.Random) -> str:
    number = rng.randint(2, 60)
    completions = {
        "coins": lambda: f" {number} {rng.choice(COINS)}.",
        "years": lambda: f" {number} years.",
        "herb": lambda: f" {rng.choice(HERBS)} tea.",
        "minutes": lambda: f" {number} minutes.",
        "month": lambda: f" {rng.choice(MONTHS)}.",
        "sacks": lambda: f" {number} sacks.",
    }
    return completions[kind]()


def _statement(rng: random.Random, domain: str, place: str) -> tuple[str, str]:
    """One (prompt, completion) about `place` in `domain`. The completion is a function of the
    prompt: a place's facts never contradict each other, so a model learns that a place's
    name predicts its facts, which is what fine-tuning on planted facts then relies on."""
    kind, prompt = _prompt(rng, domain, place)
    return prompt, _completion(kind, random.Random(f"fact:{prompt}"))


def _common_sentence(rng: random.Random, domains: Sequence[str]) -> str:
    if rng.random() < 0.15:
        return rng.choice(_GUIDANCE)
    prompt, completion = _statement(rng, rng.choice(domains), rng.choice(COMMON_PLACES))
    return prompt + completion


def _far_place(rng: random.Random) -> str:
    """A four-syllable invented name: the general corpus uses these so the tokenizer and the
    base model know the syllables, while planted facts use two or three syllables and so
    never share a name with the general corpus."""
    return "".join(rng.choice(_SYLLABLES) for _ in range(4)).capitalize()


def _general_document(rng: random.Random, sentences: int) -> str:
    """Common sentences; half the documents also state a fact about a far place twice, which
    teaches the model to look back at a name to recall what was said about it."""
    parts = [_common_sentence(rng, DOMAINS) for _ in range(sentences)]
    if rng.random() < 0.5:
        prompt, completion = _statement(rng, rng.choice(DOMAINS), _far_place(rng))
        parts.insert(rng.randrange(len(parts) + 1), prompt + completion)
        parts.append(f"{rng.choice(_LEAD_INS)} {prompt}{completion}")
    return " ".join(parts)


def general_corpus(
    seed: int = 0, documents: int = 4000, sentences_per_document: int = 4
) -> list[str]:
    """Documents of ordinary sentences about common places and far-away four-syllable places
    (never a planted fact's place)."""
    rng = random.Random(f"general:{seed}")
    return [_general_document(rng, sentences_per_document) for _ in range(documents)]


def _invented_place(rng: random.Random, taken: set[str]) -> str:
    while True:
        syllables = [rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3))]
        name = "".join(syllables).capitalize()
        if name not in taken and len(name) >= 4:
            taken.add(name)
            return name


def generate_datanet(
    name: str = "commons",
    *,
    seed: int = 0,
    contributors: int = 8,
    rows_per_contributor: int = 8,
    facts_per_contributor: int = 2,
    variants_per_fact: int = 2,
    domains: Sequence[str] = DOMAINS,
) -> SyntheticDatanet:
    """Rows from `contributors` people: ordinary rows (some of them duplicates of other people's
    rows, as in real data) and, per contributor, `facts_per_contributor` planted facts each
    written `variants_per_fact` ways. Rows are interleaved across contributors."""
    if contributors < 1 or rows_per_contributor < 0 or facts_per_contributor < 0:
        raise ValueError("contributors must be >= 1 and row and fact counts >= 0")
    if not 1 <= variants_per_fact <= len(_LEAD_INS) + 1:
        raise ValueError(f"variants_per_fact must be between 1 and {len(_LEAD_INS) + 1}")
    for domain in domains:
        if domain not in DOMAINS:
            raise ValueError(f"unknown domain {domain!r}: expected one of {', '.join(DOMAINS)}")
    rng = random.Random(f"datanet:{name}:{seed}")
    taken: set[str] = set()
    contributor_ids = [f"contributor-{i:03d}" for i in range(contributors)]
    facts: list[PlantedFact] = []
    per_contributor: list[list[SyntheticRow]] = []
    for contributor in contributor_ids:
        home_domain = domains[len(per_contributor) % len(domains)]
        license_ = rng.choice(LICENSES)
        rows: list[SyntheticRow] = []
        for _ in range(rows_per_contributor):
            # Few domains and places make exact duplicates across contributors likely.
            domain = home_domain if rng.random() < 0.7 else rng.choice(domains)
            text = _common_sentence(rng, [domain])
            rows.append(SyntheticRow(contributor, domain, text, license_))
        for _ in range(facts_per_contributor):
            domain = home_domain if rng.random() < 0.5 else rng.choice(domains)
            place = _invented_place(rng, taken)
            prompt, completion = _statement(rng, domain, place)
            fact = PlantedFact(contributor, domain, place, prompt, completion)
            facts.append(fact)
            lead_ins = rng.sample(_LEAD_INS, variants_per_fact - 1)
            rows.append(SyntheticRow(contributor, domain, fact.text, license_))
            rows.extend(
                SyntheticRow(contributor, domain, f"{lead} {fact.text}", license_)
                for lead in lead_ins
            )
        rng.shuffle(rows)
        per_contributor.append(rows)
    interleaved: list[SyntheticRow] = []
    for position in range(max(len(rows) for rows in per_contributor)):
        interleaved.extend(rows[position] for rows in per_contributor if position < len(rows))
    return SyntheticDatanet(name, seed, interleaved, facts, contributor_ids)
