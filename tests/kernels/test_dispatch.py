"""add_lora's contract beyond the numbers: input checks, backend choice, cheap no-op paths and
strided outputs. Both backends run here (Triton through its interpreter)."""

import pytest
import torch

from kernels.cases import make_case
from kernels.dispatch import LoraBatch, add_lora, use_backend

BACKENDS = ["torch", "triton"]


def small_case(dtype: torch.dtype = torch.float32):
    return make_case(
        "uniform",
        16,
        num_requests=6,
        prefill=True,
        in_features=24,
        out_features=20,
        dtype=dtype,
        seed=3,
    )


def call(case, batch=None, **overrides):
    args = dict(
        y=case.y,
        x=case.x,
        lora_a=case.lora_a,
        lora_b=case.lora_b,
        ranks=case.ranks,
        scales=case.scales,
        batch=batch or case.batch(True),
    )
    args.update(overrides)
    add_lora(**args)


def with_rank(ranks: torch.Tensor, rank: int) -> torch.Tensor:
    ranks = ranks.clone()
    ranks[0] = rank
    return ranks


BAD_INPUTS = [
    (lambda c: {"x": torch.zeros(3, 24)}, ValueError, "x has 3 rows"),
    (lambda c: {"x": c.x[None]}, ValueError, r"x must be \[num_tokens, in_features\]"),
    (lambda c: {"x": c.x.half()}, TypeError, "inputs must share one dtype"),
    (
        lambda c: {"lora_a": c.lora_a.transpose(1, 2).contiguous().transpose(1, 2)},
        ValueError,
        "lora_a must be contiguous",
    ),
    (lambda c: {"lora_b": torch.zeros(5, 20, 16)}, ValueError, "lora_b has 5 slots"),
    (lambda c: {"ranks": c.ranks.float()}, TypeError, "ranks must have dtype in"),
    (lambda c: {"scales": c.scales.double()}, TypeError, "scales must have dtype in"),
    (lambda c: {"ranks": with_rank(c.ranks, 17)}, ValueError, r"ranks must lie in \[0, 16\]"),
    (lambda c: {"y": c.y.to(torch.int32)}, TypeError, "y must have dtype in"),
    (lambda c: {"y": c.y.t().contiguous().t()}, ValueError, "y must have unit stride"),
]


@pytest.mark.parametrize(("overrides", "error", "message"), BAD_INPUTS)
def test_bad_inputs_fail_with_one_line(overrides, error, message) -> None:
    case = small_case()
    with pytest.raises(error, match=message) as info:
        call(case, **overrides(case))
    assert "\n" not in str(info.value)


def test_slot_outside_the_pool_is_rejected() -> None:
    case = small_case()
    batch = LoraBatch.from_token_slots(torch.full((case.x.shape[0],), 99), prefill=False)
    with pytest.raises(ValueError, match="token slot 99 is out of range"):
        call(case, batch)


def test_unknown_backend_is_rejected() -> None:
    case = small_case()
    with pytest.raises(ValueError, match="unknown LoRA backend 'cuda'"):
        call(case, backend="cuda")
    with pytest.raises(ValueError, match="unknown LoRA backend"), use_backend("fast"):
        pass


def test_use_backend_routes_calls_and_resets(monkeypatch) -> None:
    import kernels.dispatch as dispatch

    used = []
    monkeypatch.setattr(dispatch, "_add_lora_triton", lambda *a: used.append("triton"))
    monkeypatch.setattr(dispatch, "add_lora_torch", lambda *a, **k: used.append("torch"))
    case = small_case()
    with use_backend("triton"):
        call(case)
        call(case, backend="torch")  # an explicit argument wins over the context
    call(case)
    assert used == ["triton", "torch", "torch"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_without_adapters_leaves_y_untouched(backend: str) -> None:
    case = small_case()
    case.x.fill_(float("nan"))  # would poison y if any work were done
    before = case.y.clone()
    batch = LoraBatch.from_token_slots(torch.full((case.x.shape[0],), -1), prefill=True)
    call(case, batch, backend=backend)
    assert torch.equal(case.y, before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("prefill", [True, False], ids=["prefill", "decode"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_column_slice_of_a_fused_output(
    check_run, backend: str, prefill: bool, dtype: torch.dtype
) -> None:
    """The model adds each projection's delta into its columns of a fused q|k|v output."""
    case = make_case(
        "with_base",
        "mix",
        num_requests=6,
        prefill=prefill,
        in_features=40,
        out_features=24,
        dtype=dtype,
        seed=11,
    )
    fused = torch.randn(case.y.shape[0], 24 * 3).to(dtype)
    fused_before = fused.clone()
    fused[:, 24:48] = case.y
    case.y = fused[:, 24:48]
    check_run(
        case,
        lambda c: add_lora(
            c.y, c.x, c.lora_a, c.lora_b, c.ranks, c.scales, c.batch(prefill), backend=backend
        ),
    )
    assert torch.equal(fused[:, :24], fused_before[:, :24])
    assert torch.equal(fused[:, 48:], fused_before[:, 48:])


@pytest.mark.parametrize("backend", BACKENDS)
def test_cleared_slot_of_rank_zero_adds_nothing(backend: str) -> None:
    case = small_case()
    case.ranks[:] = 0
    case.lora_a.fill_(float("nan"))
    case.lora_b.fill_(float("nan"))
    before = case.y.clone()
    call(case, backend=backend)
    assert torch.equal(case.y, before)
