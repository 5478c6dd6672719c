"""What the four kernel wrappers share: picking the runnable kernel and splitting K.

CPU tensors cannot reach compiled Triton code, so a kernel launched on them runs under Triton's
interpreter. The interpreted copy is built here, per launch, from the kernel's Python source,
instead of relying on TRITON_INTERPRET having been set before Triton was first imported: the
choice then follows the tensors' device, and CUDA launches in the same process stay compiled.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.interpreter import (
    InterpretedFunction,
    InterpreterBuilder,
    TensorHandle,
    _patch_lang,
)
from triton.runtime.jit import JITFunction

# CUDA caps the second and third grid dimensions; segments run along the third.
MAX_GRID_SEGMENTS = 65535

# Programs that keep every SM of a large GPU busy for a memory-bound GEMV; split K until reached.
_TARGET_PROGRAMS = 512
_MAX_SPLIT_K = 16

_interpreted: dict[Callable[..., Any], InterpretedFunction] = {}


def runnable(kernel: JITFunction | InterpretedFunction, like: Tensor) -> Any:
    """`kernel`, indexable by grid, for tensors on `like`'s device.

    Compiled on CUDA; on any other device an interpreted copy (Triton's interpreter runs the
    kernel body with NumPy, one program at a time).
    """
    if like.is_cuda and not isinstance(kernel, InterpretedFunction):
        return kernel
    # Also when TRITON_INTERPRET made the kernel interpreted already: the launch wrapper
    # carries the interpreter fixes below.
    return _InterpretedKernel(_interpreted_copy(kernel))


def split_k_for(programs_without_split: int, k_blocks: int) -> int:
    """How many slices to cut the reduction dimension into so the grid fills a large GPU."""
    wanted = triton.cdiv(_TARGET_PROGRAMS, max(programs_without_split, 1))
    return max(1, min(wanted, k_blocks, _MAX_SPLIT_K))


def check_grid_segments(num_segments: int) -> None:
    if num_segments > MAX_GRID_SEGMENTS:
        raise ValueError(
            f"{num_segments} segments exceed the {MAX_GRID_SEGMENTS} a launch can take; "
            "split the prefill batch"
        )


def rank_block(max_rank: int) -> int:
    """One tile spans the whole rank; tl.dot needs every tile dimension >= 16."""
    return max(16, triton.next_power_of_2(max_rank))


class _InterpretedKernel:
    def __init__(self, kernel: InterpretedFunction) -> None:
        self._kernel = kernel

    def __getitem__(self, grid: tuple[int, ...]) -> Callable[..., None]:
        def launch(*args: Any, **kwargs: Any) -> None:
            with _jit_calls_interpreted():
                self._kernel[grid](*args, **kwargs)

        return launch


def _interpreted_copy(kernel: JITFunction | InterpretedFunction) -> InterpretedFunction:
    if isinstance(kernel, InterpretedFunction):
        return kernel
    if kernel.fn not in _interpreted:
        _interpreted[kernel.fn] = InterpretedFunction(kernel.fn)
    return _interpreted[kernel.fn]


@contextmanager
def _jit_calls_interpreted() -> Iterator[None]:
    # triton.language helpers (tl.zeros, tl.sum, ...) are themselves compiled-mode JIT functions
    # when Triton was imported without TRITON_INTERPRET; while an interpreted kernel runs, calls
    # to them must run interpreted too.
    original_call = JITFunction.__call__
    original_device_call = InterpretedFunction.__call__
    original_dot = InterpreterBuilder.create_dot

    def call_interpreted(self: JITFunction, *args: Any, **kwargs: Any) -> Any:
        return _interpreted_copy(self)(*args, **kwargs)

    def device_call_restoring(self: InterpretedFunction, *args: Any, **kwargs: Any) -> Any:
        # Triton's own device-function call patches triton.language for the callee and never
        # undoes it; compiling a kernel later in the process would then build IR with the
        # interpreter's semantics. Same call, with the patch undone on return.
        scope = _patch_lang(self.fn)
        try:
            return self.rewrite()(*args, **kwargs)
        finally:
            scope.restore()

    def dot_bf16_as_float32(self: InterpreterBuilder, a: Any, b: Any, *rest: Any) -> Any:
        # The interpreter keeps bfloat16 as its raw uint16 bits and would multiply those as
        # integers; widen to float32 first (exact), as the hardware's bf16 MMA does.
        return original_dot(self, _widen_bf16(a), _widen_bf16(b), *rest)

    JITFunction.__call__ = call_interpreted  # type: ignore[method-assign]
    InterpretedFunction.__call__ = device_call_restoring  # type: ignore[method-assign]
    InterpreterBuilder.create_dot = dot_bf16_as_float32  # type: ignore[method-assign]
    try:
        yield
    finally:
        JITFunction.__call__ = original_call  # type: ignore[method-assign]
        InterpretedFunction.__call__ = original_device_call  # type: ignore[method-assign]
        InterpreterBuilder.create_dot = original_dot  # type: ignore[method-assign]


def _widen_bf16(handle: TensorHandle) -> TensorHandle:
    if handle.dtype.scalar != tl.bfloat16:
        return handle
    widened = (handle.data.astype(np.uint32) << np.uint32(16)).view(np.float32)
    return TensorHandle(widened, tl.float32)
