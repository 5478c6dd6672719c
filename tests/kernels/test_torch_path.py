"""The CPU fast path (what CPU serving runs) against the float64 reference."""

import pytest
import torch

from kernels.cases import POPULARITIES, RANK_CLASSES, make_case, poison_rows_without_adapter
from kernels.dispatch import add_lora, add_lora_trusted
from kernels.torch_path import add_lora_torch


def run_torch(prefill: bool):
    def run(case) -> None:
        add_lora(
            case.y,
            case.x,
            case.lora_a,
            case.lora_b,
            case.ranks,
            case.scales,
            case.batch(prefill),
            backend="torch",
        )

    return run


@pytest.mark.parametrize("prefill", [True, False], ids=["prefill", "decode"])
@pytest.mark.parametrize("rank_class", RANK_CLASSES)
@pytest.mark.parametrize("popularity", POPULARITIES)
def test_matches_reference(check_run, popularity: str, rank_class, prefill: bool) -> None:
    case = make_case(
        popularity,
        rank_class,
        num_requests=12,
        prefill=prefill,
        in_features=72,
        out_features=40,
        seed=POPULARITIES.index(popularity) * 10 + RANK_CLASSES.index(rank_class),
    )
    check_run(case, run_torch(prefill))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("prefill", [True, False], ids=["prefill", "decode"])
def test_half_precision(check_run, dtype: torch.dtype, prefill: bool) -> None:
    case = make_case(
        "with_base",
        "mix",
        num_requests=10,
        prefill=prefill,
        in_features=48,
        out_features=56,
        dtype=dtype,
        seed=7,
    )
    check_run(case, run_torch(prefill))


def test_auto_backend_on_cpu_uses_the_torch_path(check_run, monkeypatch) -> None:
    import kernels.dispatch as dispatch

    def no_triton(*args, **kwargs):
        raise AssertionError("the Triton path ran for CPU tensors")

    monkeypatch.setattr(dispatch, "_add_lora_triton", no_triton)
    case = make_case("zipf", 16, num_requests=8, prefill=False, in_features=32, out_features=32)
    check_run(
        case, lambda c: add_lora(c.y, c.x, c.lora_a, c.lora_b, c.ranks, c.scales, c.batch(False))
    )


def force(strategy: str) -> dict[str, int]:
    """Thresholds that make add_lora_torch take `strategy` whatever the batch."""
    if strategy == "gathered":
        return {"gather_min_slots": 1, "gather_max_slot_elements": 10**9}
    return {"gather_min_slots": 10**6}


@pytest.mark.parametrize("strategy", ["grouped", "gathered"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("popularity", POPULARITIES)
def test_both_decode_strategies_match_reference(
    check_run, popularity: str, dtype: torch.dtype, strategy: str
) -> None:
    # "mix" puts slots of several ranks (and NaN padding) in one pool: the gathered path must
    # bucket them by rank and never read the padding.
    case = make_case(
        popularity,
        "mix",
        num_requests=14,
        prefill=False,
        in_features=40,
        out_features=24,
        dtype=dtype,
        seed=POPULARITIES.index(popularity) + 50,
    )

    def run(c) -> None:
        batch = c.batch(False)
        add_lora_torch(c.y, c.x, c.lora_a, c.lora_b, c.ranks, c.scales, batch, **force(strategy))

    check_run(case, run)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("prefill", "strategy"),
    [(True, "grouped"), (False, "grouped"), (False, "gathered")],
    ids=["prefill", "decode-grouped", "decode-gathered"],
)
def test_rows_without_adapter_keep_their_bits(
    check_run, prefill: bool, strategy: str, dtype: torch.dtype
) -> None:
    case = make_case(
        "with_base",
        "mix",
        num_requests=12,
        prefill=prefill,
        in_features=513,
        out_features=24,
        dtype=dtype,
        seed=11,
    )
    poison_rows_without_adapter(case)

    def run(c) -> None:
        batch = c.batch(prefill)
        add_lora_torch(c.y, c.x, c.lora_a, c.lora_b, c.ranks, c.scales, batch, **force(strategy))

    check_run(case, run)


@pytest.mark.parametrize("strategy", ["grouped", "gathered"])
def test_trusted_call_with_host_copies_matches_reference(check_run, strategy: str) -> None:
    case = make_case("zipf", "mix", num_requests=16, prefill=False, in_features=32, out_features=48)

    def run(c) -> None:
        add_lora_torch(
            c.y,
            c.x,
            c.lora_a,
            c.lora_b,
            c.ranks,
            c.scales,
            c.batch(False),
            host_ranks=c.ranks.tolist(),
            host_scales=c.scales.tolist(),
            slot_views=[
                (c.lora_a[s, :r], c.lora_b[s, :, :r].t()) if r else None
                for s, r in enumerate(c.ranks.tolist())
            ],
            **force(strategy),
        )

    check_run(case, run)


def test_trusted_dispatch_skips_checks_but_computes_the_same(check_run) -> None:
    case = make_case("uniform", 16, num_requests=9, prefill=False, in_features=24, out_features=16)
    check_run(
        case,
        lambda c: add_lora_trusted(c.y, c.x, c.lora_a, c.lora_b, c.ranks, c.scales, c.batch(False)),
    )
