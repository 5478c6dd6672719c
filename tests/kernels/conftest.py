"""Fixtures for the kernel tests.

Triton kernels run on CPU tensors under Triton's interpreter: kernels.launch builds the
interpreted copy per launch, so no TRITON_INTERPRET setting is needed and import order does not
matter. CUDA cases are marked `gpu` and skip without a device.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from kernels.cases import LoraCase, reference_problems


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    # The cases are far too small to gain from threads, and the test machine is shared.
    torch.set_num_threads(1)


@pytest.fixture
def check_run() -> Callable[[LoraCase, Callable[[LoraCase], None]], None]:
    """check_run(case, run): run(case) updates case.y in place; assert it matches the reference."""

    def check(case: LoraCase, run: Callable[[LoraCase], None]) -> None:
        expected = case.expected()
        before = case.y.clone()
        run(case)
        problems = reference_problems(case, before, expected)
        assert not problems, "; ".join(problems)

    return check


@pytest.fixture
def cuda() -> str:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    return "cuda"
