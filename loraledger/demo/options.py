"""What one demo run is made of: its datanets and the options the command line sets."""

from __future__ import annotations

from dataclasses import dataclass, field

from inference.factory import TrainConfig


@dataclass(frozen=True)
class DemoDatanet:
    name: str
    domain: str
    tag: str  # prefixes contributor ids: synthetic ids restart at 000 in every datanet
    description: str


DATANETS: tuple[DemoDatanet, ...] = (
    DemoDatanet("valley-law", "legal", "law", "Regional legal rules: taxes, land charters."),
    DemoDatanet("village-health", "health", "health", "Local health guidance from healers."),
    DemoDatanet("farm-almanac", "farming", "farm", "Sowing months and yields by village."),
    DemoDatanet("market-prices", "market", "market", "What goods cost at each market."),
)


@dataclass(frozen=True)
class DemoOptions:
    requests: int = 300
    adapters: int = 3
    keep_running: bool = False
    fresh: bool = False
    base_preset: str = "default"
    contributors_per_datanet: int = 12
    rows_per_contributor: int = 6
    facts_per_contributor: int = 2
    max_new_tokens: int = 12
    fact_share: float = 0.6  # the rest are general prompts
    train: TrainConfig = field(default_factory=TrainConfig)
    wait_timeout_s: float = 600.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.adapters <= len(DATANETS):
            raise ValueError(f"--adapters must be between 1 and {len(DATANETS)}")
        if self.requests < 1:
            raise ValueError("--requests must be at least 1")
