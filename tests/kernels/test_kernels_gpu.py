"""The same cases on a CUDA device, where add_lora runs the compiled Triton kernels; plus sizes
closer to serving. Skipped without a GPU."""

import pytest
import torch

from kernels.cases import POPULARITIES, RANK_CLASSES, LoraCase, make_case
from kernels.dispatch import add_lora

pytestmark = pytest.mark.gpu

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def run_auto(prefill: bool):
    def run(case: LoraCase) -> None:
        add_lora(
            case.y, case.x, case.lora_a, case.lora_b, case.ranks, case.scales, case.batch(prefill)
        )
        torch.cuda.synchronize()

    return run


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("prefill", [True, False], ids=["sgmv", "bgmv"])
@pytest.mark.parametrize("rank_class", RANK_CLASSES)
@pytest.mark.parametrize("popularity", POPULARITIES)
def test_add_lora_on_cuda(check_run, cuda, popularity, rank_class, prefill, dtype) -> None:
    seed = POPULARITIES.index(popularity) * 10 + RANK_CLASSES.index(rank_class)
    case = make_case(
        popularity,
        rank_class,
        num_requests=8,
        prefill=prefill,
        in_features=72,
        out_features=40,
        dtype=dtype,
        seed=seed,
    ).to(cuda)
    check_run(case, run_auto(prefill))


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("prefill", [True, False], ids=["sgmv", "bgmv"])
def test_serving_sizes_on_cuda(check_run, cuda, prefill, dtype) -> None:
    case = make_case(
        "zipf",
        "mix",
        num_requests=64,
        prefill=prefill,
        in_features=2048,
        out_features=1536,
        dtype=dtype,
        seed=1,
    ).to(cuda)
    check_run(case, run_auto(prefill))
