"""Synthetic data: a general corpus for the tokenizer and base model, and datanets with
planted facts whose contributors are known."""

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
    "PlantedFact",
    "SyntheticDatanet",
    "SyntheticRow",
    "general_corpus",
    "generate_datanet",
]
