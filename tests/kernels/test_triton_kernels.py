"""The four Triton kernels, run on CPU tensors under Triton's interpreter, against the float64
reference: through add_lora (SGMV for prefill, BGMV for decode) and one kernel at a time."""

import pytest
import torch
from triton.runtime.jit import JITFunction

from kernels import launch
from kernels.bgmv_expand import bgmv_expand
from kernels.bgmv_shrink import _bgmv_shrink_kernel, bgmv_shrink
from kernels.cases import POPULARITIES, RANK_CLASSES, TOLERANCES, LoraCase, make_case
from kernels.dispatch import add_lora
from kernels.reference import reference_expand, reference_shrink
from kernels.sgmv_expand import sgmv_expand
from kernels.sgmv_shrink import sgmv_shrink


def run_triton(prefill: bool):
    def run(case: LoraCase) -> None:
        add_lora(
            case.y,
            case.x,
            case.lora_a,
            case.lora_b,
            case.ranks,
            case.scales,
            case.batch(prefill),
            backend="triton",
        )

    return run


@pytest.mark.parametrize("prefill", [True, False], ids=["sgmv", "bgmv"])
@pytest.mark.parametrize("rank_class", RANK_CLASSES)
@pytest.mark.parametrize("popularity", POPULARITIES)
def test_add_lora_matches_reference(check_run, popularity: str, rank_class, prefill: bool) -> None:
    seed = POPULARITIES.index(popularity) * 10 + RANK_CLASSES.index(rank_class)
    # 40 and 72 are not multiples of any tile size, so every edge mask is exercised.
    case = make_case(
        popularity,
        rank_class,
        num_requests=8,
        prefill=prefill,
        in_features=72,
        out_features=40,
        seed=seed,
    )
    check_run(case, run_triton(prefill))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("prefill", [True, False], ids=["sgmv", "bgmv"])
@pytest.mark.parametrize("popularity", POPULARITIES)
def test_half_precision(check_run, dtype: torch.dtype, prefill: bool, popularity: str) -> None:
    case = make_case(
        popularity,
        "mix",
        num_requests=8,
        prefill=prefill,
        in_features=96,
        out_features=33,
        dtype=dtype,
        seed=5,
    )
    check_run(case, run_triton(prefill))


@pytest.mark.parametrize("prefill", [True, False], ids=["sgmv", "bgmv"])
def test_wide_input_splits_the_reduction(check_run, prefill: bool) -> None:
    """in_features spanning several K tiles makes the shrink split K over programs."""
    case = make_case(
        "uniform", 64, num_requests=3, prefill=prefill, in_features=300, out_features=24, seed=9
    )
    check_run(case, run_triton(prefill))


def written_entries(case: LoraCase) -> torch.Tensor:
    """Mask of the shrink output a kernel must write: active rows, columns below the rank."""
    ranks = case.ranks.long()[case.token_slots.clamp(min=0)]
    columns = torch.arange(case.lora_a.shape[1])[None, :]
    return (case.token_slots >= 0)[:, None] & (columns < ranks[:, None])


@pytest.mark.parametrize("prefill", [True, False], ids=["sgmv", "bgmv"])
def test_shrink_writes_the_scaled_projection(prefill: bool) -> None:
    case = make_case(
        "with_base", "mix", num_requests=8, prefill=prefill, in_features=56, out_features=8, seed=2
    )
    out = torch.full((case.x.shape[0], case.lora_a.shape[1]), float("nan"))
    batch = case.batch(prefill)
    if prefill:
        seg = batch.segments
        sgmv_shrink(
            case.x,
            case.lora_a,
            out,
            seg.seg_starts,
            seg.seg_lens,
            seg.seg_slots,
            seg.max_seg_len,
            case.ranks,
            case.scales,
        )
    else:
        bgmv_shrink(case.x, case.lora_a, out, case.token_slots, case.ranks, case.scales)
    expected = reference_shrink(case.x, case.lora_a, case.ranks, case.scales, case.token_slots)
    written = written_entries(case)
    torch.testing.assert_close(
        out[written].double(), expected[written], **TOLERANCES[torch.float32]
    )


@pytest.mark.parametrize("prefill", [True, False], ids=["sgmv", "bgmv"])
def test_expand_reads_only_each_tokens_rank(prefill: bool) -> None:
    case = make_case(
        "with_base", "mix", num_requests=8, prefill=prefill, in_features=8, out_features=50, seed=4
    )
    t = torch.randn(case.x.shape[0], case.lora_a.shape[1])
    t[~written_entries(case)] = float("nan")  # entries the shrink leaves unspecified
    expected = reference_expand(case.y, t, case.lora_b, case.ranks, case.token_slots)
    before = case.y.clone()
    batch = case.batch(prefill)
    if prefill:
        seg = batch.segments
        sgmv_expand(
            t,
            case.lora_b,
            case.y,
            seg.seg_starts,
            seg.seg_lens,
            seg.seg_slots,
            seg.max_seg_len,
            case.ranks,
        )
    else:
        bgmv_expand(t, case.lora_b, case.y, case.token_slots, case.ranks)
    active = case.token_slots >= 0
    assert torch.equal(case.y[~active], before[~active])
    torch.testing.assert_close(
        case.y[active].double(), expected[active], **TOLERANCES[torch.float32]
    )


def test_cpu_launches_are_interpreted_and_leave_compiled_mode_intact() -> None:
    cpu_launcher = launch.runnable(_bgmv_shrink_kernel, torch.zeros(1))
    assert isinstance(cpu_launcher, launch._InterpretedKernel)
    case = make_case("identical", 8, num_requests=2, prefill=False, in_features=16, out_features=16)
    run_triton(False)(case)
    # After an interpreted launch, compiled-mode JIT functions refuse host calls again.
    with pytest.raises(RuntimeError, match="outside of the scope of a kernel"):
        JITFunction.__call__(_bgmv_shrink_kernel)
