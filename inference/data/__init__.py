"""Synthetic data: a general corpus for the tokenizer and base model, datanets with planted
facts whose contributors are known, and paraphrases of those facts."""

from inference.data.paraphrases import Paraphrase, paraphrase
from inference.data.synthetic import (
    CORPUS_VERSION,
    DOMAINS,
    PlantedFact,
    SyntheticDatanet,
    SyntheticRow,
    general_corpus,
    generate_datanet,
)

__all__ = [
    "CORPUS_VERSION",
    "DOMAINS",
    "Paraphrase",
    "PlantedFact",
    "SyntheticDatanet",
    "SyntheticRow",
    "general_corpus",
    "generate_datanet",
    "paraphrase",
]
