"""The kernels compile for a Hopper GPU (sm_90) ahead of time, without one present.

The interpreter runs the kernel bodies as Python and accepts things the compiler rejects (dot
operand types, tile shapes, layouts); compiling catches those on machines without a GPU. Each test
compiles into an empty cache, so a cached binary cannot stand in for a compile.
"""

import pytest
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kernels.bgmv_expand import _bgmv_expand_kernel
from kernels.bgmv_shrink import _bgmv_shrink_kernel, _bgmv_sum_splits_kernel, bgmv_shrink
from kernels.cases import make_case
from kernels.sgmv_expand import _sgmv_expand_kernel
from kernels.sgmv_shrink import _sgmv_shrink_kernel, _sgmv_sum_splits_kernel

SEGMENTS = {"seg_starts_ptr": "*i32", "seg_lens_ptr": "*i32", "seg_slots_ptr": "*i32"}


@pytest.fixture(autouse=True)
def _empty_triton_cache(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))


def kernels_for(dt: str) -> list:
    """(kernel, pointer argument types, the largest tiles the wrappers pick)."""
    precision = "ieee" if dt == "fp32" else "tf32"
    return [
        (
            _sgmv_shrink_kernel,
            {"x_ptr": f"*{dt}", "a_ptr": f"*{dt}", "out_ptr": "*fp32", **SEGMENTS,
             "ranks_ptr": "*i32", "scales_ptr": "*fp32"},
            {"BLOCK_M": 64, "BLOCK_R": 64, "BLOCK_K": 64, "DOT_PRECISION": precision},
        ),
        (
            _sgmv_expand_kernel,
            {"t_ptr": "*fp32", "b_ptr": f"*{dt}", "y_ptr": f"*{dt}", **SEGMENTS,
             "ranks_ptr": "*i32"},
            {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_R": 64, "DOT_PRECISION": precision},
        ),
        (
            _bgmv_shrink_kernel,
            {"x_ptr": f"*{dt}", "a_ptr": f"*{dt}", "out_ptr": "*fp32", "token_slots_ptr": "*i64",
             "ranks_ptr": "*i32", "scales_ptr": "*fp32"},
            {"BLOCK_R": 64, "BLOCK_K": 128},
        ),
        (
            _bgmv_expand_kernel,
            {"t_ptr": "*fp32", "b_ptr": f"*{dt}", "y_ptr": f"*{dt}", "token_slots_ptr": "*i64",
             "ranks_ptr": "*i32"},
            {"BLOCK_N": 128, "BLOCK_R": 64},
        ),
    ]  # fmt: skip


# The split-K sums read and write float32 whatever the input dtype.
SPLIT_SUMS = [
    (
        _sgmv_sum_splits_kernel,
        {"partial_ptr": "*fp32", "out_ptr": "*fp32", **SEGMENTS, "ranks_ptr": "*i32"},
        {"BLOCK_M": 64, "BLOCK_R": 64},
    ),
    (
        _bgmv_sum_splits_kernel,
        {"partial_ptr": "*fp32", "out_ptr": "*fp32", "token_slots_ptr": "*i64",
         "ranks_ptr": "*i32"},
        {"BLOCK_R": 64},
    ),
]  # fmt: skip


def compile_for_sm90(kernel, pointers: dict[str, str], constexprs: dict[str, object]) -> None:
    signature = {
        name: "constexpr" if name in constexprs else pointers.get(name, "i32")
        for name in kernel.arg_names
    }
    source = ASTSource(
        fn=kernel,
        signature=signature,
        constexprs={(kernel.arg_names.index(n),): v for n, v in constexprs.items()},
    )
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32))
    assert compiled.asm["cubin"], f"{kernel.fn.__name__} produced no cubin"


@pytest.mark.parametrize("dt", ["bf16", "fp32"])
def test_kernels_compile_for_sm90(dt: str) -> None:
    for kernel, pointers, constexprs in kernels_for(dt):
        compile_for_sm90(kernel, pointers, constexprs)


def test_split_sums_compile_for_sm90() -> None:
    for kernel, pointers, constexprs in SPLIT_SUMS:
        compile_for_sm90(kernel, pointers, constexprs)


def test_compiling_after_an_interpreted_launch() -> None:
    # The interpreted kernel calls triton.language helpers (tl.zeros, tl.sum); running it must
    # leave compiled-mode code generation as it found it.
    case = make_case("identical", 16, num_requests=2, prefill=False, in_features=16, out_features=8)
    out = torch.zeros(case.x.shape[0], case.lora_a.shape[1])
    bgmv_shrink(case.x, case.lora_a, out, case.token_slots, case.ranks, case.scales)
    assert out.abs().sum() > 0
    for kernel, pointers, constexprs in kernels_for("fp32"):
        compile_for_sm90(kernel, pointers, constexprs)
