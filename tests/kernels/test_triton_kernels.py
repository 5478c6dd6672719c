"""The four Triton kernels, run on CPU tensors under Triton's interpreter, against the float64
reference: through add_lora (SGMV for prefill, BGMV for decode) and one kernel at a time."""

import pytest
import torch
from triton.runtime.jit import JITFunction

import kernels.bgmv_shrink
import kernels.sgmv_shrink
from kernels import launch
from kernels.bgmv_expand import bgmv_expand
from kernels.bgmv_shrink import _bgmv_shrink_kernel, bgmv_shrink
from kernels.cases import (
    POPULARITIES,
    RANK_CLASSES,
    TOLERANCES,
    LoraCase,
    make_case,
    poison_rows_without_adapter,
    same_bits,
    sentinel,
)
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


# (in_features, rank class, whether the shrink splits K). The wide inputs span several K tiles
# with few programs, so both shrinks split the reduction over programs and sum the slices in a
# second launch; at 56 one K tile holds the whole input.
SHRINK_SHAPES = [(513, 64, True), (300, "mix", True), (1000, 16, True), (56, "mix", False)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("prefill", [True, False], ids=["sgmv", "bgmv"])
@pytest.mark.parametrize(("in_features", "rank_class"), [(513, 64), (300, "mix")])
def test_split_reduction_leaves_rows_without_adapter_alone(
    check_run, in_features: int, rank_class, prefill: bool, dtype: torch.dtype
) -> None:
    case = make_case(
        "with_base",
        rank_class,
        num_requests=8,
        prefill=prefill,
        in_features=in_features,
        out_features=24,
        dtype=dtype,
        seed=9,
    )
    poison_rows_without_adapter(case)
    check_run(case, run_triton(prefill))


def written_entries(case: LoraCase) -> torch.Tensor:
    """Mask of the shrink output a kernel must write, and the only entries it may: active rows,
    columns below the rank."""
    ranks = case.ranks.long()[case.token_slots.clamp(min=0)]
    columns = torch.arange(case.lora_a.shape[1])[None, :]
    return (case.token_slots >= 0)[:, None] & (columns < ranks[:, None])


def record_launches(monkeypatch: pytest.MonkeyPatch, module) -> list[str]:
    """Names of the kernels `module` launches from now on (the launches still run)."""
    launched: list[str] = []

    def runnable(kernel, like):
        launched.append(kernel.fn.__name__)
        return launch.runnable(kernel, like)

    monkeypatch.setattr(module, "runnable", runnable)
    return launched


@pytest.mark.parametrize("prefill", [True, False], ids=["sgmv", "bgmv"])
@pytest.mark.parametrize(("in_features", "rank_class", "splits"), SHRINK_SHAPES)
def test_shrink_writes_only_active_rows_below_their_rank(
    monkeypatch, in_features: int, rank_class, splits: bool, prefill: bool
) -> None:
    case = make_case(
        "with_base",
        rank_class,
        num_requests=8,
        prefill=prefill,
        in_features=in_features,
        out_features=8,
        seed=in_features,
    )
    poison = sentinel(torch.float32)
    out = poison.expand(case.x.shape[0], case.lora_a.shape[1]).clone()
    batch = case.batch(prefill)
    if prefill:
        launched = record_launches(monkeypatch, kernels.sgmv_shrink)
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
        launched = record_launches(monkeypatch, kernels.bgmv_shrink)
        bgmv_shrink(case.x, case.lora_a, out, case.token_slots, case.ranks, case.scales)
    expected = reference_shrink(case.x, case.lora_a, case.ranks, case.scales, case.token_slots)
    without_adapter = case.token_slots < 0
    assert without_adapter.any() and not without_adapter.all()
    rows_kept = same_bits(out[without_adapter], poison.expand_as(out[without_adapter]))
    assert rows_kept, "rows of tokens without an adapter were written"
    written = written_entries(case)
    padding_kept = same_bits(out[~written], poison.expand_as(out[~written]))
    assert padding_kept, "columns past a slot's rank were written"
    torch.testing.assert_close(
        out[written].double(), expected[written], **TOLERANCES[torch.float32]
    )
    # Each shape takes the path it is there for: split (partials, then a summing launch) or not.
    assert len(launched) == (2 if splits else 1), launched


@pytest.mark.parametrize("prefill", [True, False], ids=["sgmv", "bgmv"])
def test_expand_reads_only_each_tokens_rank(prefill: bool) -> None:
    case = make_case(
        "with_base", "mix", num_requests=8, prefill=prefill, in_features=8, out_features=50, seed=4
    )
    t = torch.randn(case.x.shape[0], case.lora_a.shape[1])
    t[~written_entries(case)] = float("nan")  # entries the shrink does not write
    poison_rows_without_adapter(case)
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
    assert same_bits(case.y[~active], before[~active])
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
