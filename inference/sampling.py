"""Next-token choice: greedy, or temperature plus nucleus (top-p) sampling.

Each request draws from its own seeded generator, so the same seed gives the same tokens
whatever else shares the batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches top_p
    seed: int = 0

    def problem(self) -> str | None:
        """Why these parameters are invalid, or None."""
        if not math.isfinite(self.temperature) or self.temperature < 0:
            return f"temperature must be a finite number >= 0, got {self.temperature}"
        if not math.isfinite(self.top_p) or not 0 < self.top_p <= 1:
            return f"top_p must lie in (0, 1], got {self.top_p}"
        if not 0 <= self.seed < 2**63:
            return f"seed must lie in [0, 2**63), got {self.seed}"
        return None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def new_generator(self) -> torch.Generator:
        return torch.Generator(device="cpu").manual_seed(self.seed)


def sample_tokens(
    logits: Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator],
) -> list[int]:
    """One token per row of `logits` [num_rows, vocab_size] (float32)."""
    if logits.shape[0] != len(params):
        raise ValueError(f"{logits.shape[0]} logits rows for {len(params)} sampling params")
    chosen = logits.argmax(dim=-1).tolist()  # greedy rows, and the default for the others
    for row, (p, generator) in enumerate(zip(params, generators, strict=True)):
        if not p.greedy:
            chosen[row] = _sample_row(logits[row].float().cpu(), p, generator)
    return chosen


def _sample_row(logits: Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        sorted_probs[mass_before >= params.top_p] = 0.0  # the first token always stays
        pick = torch.multinomial(sorted_probs, 1, generator=generator)
        return int(order[pick])
    return int(torch.multinomial(probs, 1, generator=generator))
