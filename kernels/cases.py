"""Random multi-LoRA workloads shared by the kernel tests and benchmarks.

A case is a pool of adapter slots (ranks may be below the pool's max_rank; the padding beyond
each slot's rank is NaN, so reading it anywhere poisons the result), a batch of tokens whose
slots follow an adapter-popularity pattern (Punica's distinct / uniform / zipf / identical /
skewed, plus requests without an adapter), and random x and y. Entries a run must leave alone
can be poisoned with a sentinel and compared bit for bit afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

from kernels.batch import LoraBatch
from kernels.reference import reference_add_lora

POPULARITIES = ("distinct", "uniform", "zipf", "identical", "skewed", "with_base")
RANK_CLASSES: tuple[int | str, ...] = (8, 16, 32, 64, "mix")

# Tolerances against the float64 reference: float32 kernels differ only in summation order;
# half precision also rounds y and the rank-space activations once.
TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    torch.float32: {"atol": 2e-5, "rtol": 2e-5},
    torch.float16: {"atol": 1e-2, "rtol": 1e-2},
    torch.bfloat16: {"atol": 6e-2, "rtol": 2e-2},
}

# Quiet NaNs with a payload of their own: arithmetic on ordinary numbers never yields these bits,
# and a sum that reads one is NaN.
_SENTINEL_BITS: dict[torch.dtype, tuple[torch.dtype, int]] = {
    torch.float32: (torch.int32, 0x7FC15EED),
    torch.float16: (torch.int16, 0x7E5D),
    torch.bfloat16: (torch.int16, 0x7FDD),
}


@dataclass
class LoraCase:
    y: Tensor  # [num_tokens, out_features]
    x: Tensor  # [num_tokens, in_features]
    lora_a: Tensor  # [num_slots, max_rank, in_features], NaN past each slot's rank
    lora_b: Tensor  # [num_slots, out_features, max_rank], NaN past each slot's rank
    ranks: Tensor  # [num_slots] int32
    scales: Tensor  # [num_slots] float32
    token_slots: Tensor  # [num_tokens] int64

    def batch(self, prefill: bool) -> LoraBatch:
        return LoraBatch.from_token_slots(self.token_slots, prefill, self.ranks.numel())

    def expected(self) -> Tensor:
        """y + delta in float64, from the inputs as they are before the run."""
        return reference_add_lora(
            self.y, self.x, self.lora_a, self.lora_b, self.ranks, self.scales, self.token_slots
        )

    def to(self, device: str) -> LoraCase:
        moved = {f.name: getattr(self, f.name).to(device) for f in fields(self)}
        return LoraCase(**moved)


def slot_ranks(
    rank_class: int | str, num_slots: int, gen: torch.Generator
) -> tuple[int, list[int]]:
    """(max_rank of the pool, rank of each slot). A pool holds adapters of up to its class's
    rank, so one slot gets a smaller rank and carries padding."""
    if rank_class == "mix":
        choices = torch.tensor([8, 16, 32, 64])
        ranks = choices[torch.randint(0, 4, (num_slots,), generator=gen)].tolist()
        ranks[0] = 64
        if num_slots > 1:
            ranks[1] = 5
        return 64, ranks
    max_rank = int(rank_class)
    ranks = [max_rank] * num_slots
    ranks[-1] = max(1, max_rank // 2 - 1)
    return max_rank, ranks


def request_slots(
    popularity: str, num_requests: int, gen: torch.Generator
) -> tuple[list[int], int]:
    """(slot of each request, number of slots in the pool) for an adapter-popularity pattern."""
    n = num_requests
    if popularity == "distinct":
        return torch.randperm(n, generator=gen).tolist(), n
    if popularity == "uniform":
        num_slots = max(2, n // 3)
        return torch.randint(0, num_slots, (n,), generator=gen).tolist(), num_slots
    if popularity == "zipf":
        num_slots = max(2, n // 2)
        weights = 1.0 / torch.arange(1, num_slots + 1, dtype=torch.float64) ** 1.2
        return torch.multinomial(weights, n, replacement=True, generator=gen).tolist(), num_slots
    if popularity == "identical":
        return [2] * n, 3  # slot 2 is the one with padding
    if popularity == "skewed":
        # Punica's skewed case: one hot adapter, then a long tail of single requests.
        hot = n // 2
        return [0] * hot + list(range(1, n - hot + 1)), n - hot + 1
    if popularity == "with_base":
        num_slots = 3
        slots = torch.randint(0, num_slots, (n,), generator=gen)
        slots[torch.rand(n, generator=gen) < 0.4] = -1
        slots[0] = -1
        return slots.tolist(), num_slots
    raise ValueError(f"unknown popularity {popularity!r}")


def make_case(
    popularity: str,
    rank_class: int | str,
    *,
    num_requests: int,
    prefill: bool,
    in_features: int,
    out_features: int,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> LoraCase:
    gen = torch.Generator().manual_seed(seed)
    slots, num_slots = request_slots(popularity, num_requests, gen)
    if prefill:
        # Each request is a run of 1..6 tokens; the same slot may come back in a later run.
        lengths = torch.randint(1, 7, (len(slots),), generator=gen).tolist()
        token_slots = [s for s, length in zip(slots, lengths, strict=True) for _ in range(length)]
    else:
        token_slots = slots
    max_rank, ranks = slot_ranks(rank_class, num_slots, gen)
    num_tokens = len(token_slots)

    def randn(*shape: int, std: float = 1.0) -> Tensor:
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * std).to(dtype)

    lora_a = randn(num_slots, max_rank, in_features, std=in_features**-0.5)
    lora_b = randn(num_slots, out_features, max_rank, std=max_rank**-0.5)
    for slot, rank in enumerate(ranks):
        lora_a[slot, rank:] = float("nan")
        lora_b[slot, :, rank:] = float("nan")
    return LoraCase(
        y=randn(num_tokens, out_features),
        x=randn(num_tokens, in_features),
        lora_a=lora_a,
        lora_b=lora_b,
        ranks=torch.tensor(ranks, dtype=torch.int32),
        scales=(torch.rand(num_slots, generator=gen) * 2 + 0.25).to(torch.float32),
        token_slots=torch.tensor(token_slots, dtype=torch.int64),
    )


def sentinel(dtype: torch.dtype) -> Tensor:
    """A 0-d NaN of `dtype` to fill entries that must come back untouched (see `same_bits`)."""
    bits_dtype, bits = _SENTINEL_BITS[dtype]
    return torch.tensor(bits, dtype=bits_dtype).view(dtype)


def same_bits(got: Tensor, want: Tensor) -> bool:
    """Whether two tensors hold the same values bit for bit (NaN payloads included)."""
    if got.shape != want.shape or got.dtype != want.dtype:
        return False
    as_bytes = [t.detach().cpu().contiguous().reshape(-1).view(torch.uint8) for t in (got, want)]
    return torch.equal(*as_bytes)


def poison_rows_without_adapter(case: LoraCase) -> None:
    """Fill the rows of case.y whose token has slot -1 with the sentinel, in place."""
    case.y[case.token_slots < 0] = sentinel(case.y.dtype).to(case.y.device)


def reference_problems(case: LoraCase, before: Tensor, expected: Tensor) -> list[str]:
    """What is wrong with case.y after a run, given y before it and the float64 reference.

    Rows with slot -1 must be bit-for-bit unchanged; active rows must be finite and within the
    dtype's tolerance. An empty list means the run was right.
    """
    active = (case.token_slots >= 0).cpu()
    got = case.y.detach().cpu()
    problems = []
    if not same_bits(got[~active], before.cpu()[~active]):
        problems.append("rows with slot -1 were modified")
    if not torch.isfinite(got[active]).all():
        problems.append("non-finite values in active rows (slot padding was read?)")
    tol = TOLERANCES[got.dtype]
    diff = (got[active].double() - expected[active]).abs()
    allowed = tol["atol"] + tol["rtol"] * expected[active].abs()
    if diff.numel() and bool((diff > allowed).any()):
        problems.append(f"max abs error {diff.max().item():.3g} beyond tolerance {tol}")
    return problems
