"""BGMV expand: add each decode token's rank-space activations times its LoRA B to the output."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.checks import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_contiguous,
    check_dim,
    check_dtype,
    check_rows_unit_stride,
    check_same_device,
    check_size,
)
from kernels.launch import runnable

# Elements of the B tile one program holds (BLOCK_N * BLOCK_R), and programs wanted in the grid.
_TILE_ELEMENTS = 8192
_TARGET_PROGRAMS = 512


@triton.jit
def _bgmv_expand_kernel(
    t_ptr,
    b_ptr,
    y_ptr,
    token_slots_ptr,
    ranks_ptr,
    out_features,
    max_rank,
    stride_tm,
    stride_b_slot,
    stride_bn,
    stride_ym,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    slot = tl.load(token_slots_ptr + token).to(tl.int64)
    if slot < 0:
        return
    rank = tl.minimum(tl.load(ranks_ptr + slot), max_rank)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    col_ok = offs_n < out_features
    rank_ok = offs_r < rank  # columns of B past the slot's rank are padding: never loaded

    t_vec = tl.load(t_ptr + token * stride_tm + offs_r, mask=rank_ok, other=0.0)
    b_tile = tl.load(
        b_ptr + slot * stride_b_slot + offs_n[:, None] * stride_bn + offs_r[None, :],
        mask=col_ok[:, None] & rank_ok[None, :],
        other=0.0,
    )
    delta = tl.sum(b_tile.to(tl.float32) * t_vec[None, :], axis=1)

    y_ptrs = y_ptr + token * stride_ym + offs_n
    y_vec = tl.load(y_ptrs, mask=col_ok, other=0.0)
    tl.store(y_ptrs, (y_vec.to(tl.float32) + delta).to(y_vec.dtype), mask=col_ok)


def bgmv_expand(
    t: Tensor,
    lora_b: Tensor,
    y: Tensor,
    token_slots: Tensor,
    ranks: Tensor,
) -> None:
    """Add t @ B.T of every token's own slot to y, in place.

    Semantics:
        for i in range(num_tokens):
            s = token_slots[i]
            if s < 0: continue                      # row i is neither read nor written
            r = ranks[s]
            y[i] += t[i, :r] @ lora_b[s, :, :r].T

    Args:
        t: [num_tokens, max_rank] float32 contiguous (the output of bgmv_shrink).
        lora_b: [num_slots, out_features, max_rank] float32/float16/bfloat16 contiguous.
        y: [num_tokens, out_features] dtype of lora_b, updated in place; each row dense.
        token_slots: [num_tokens] int32/int64, slot per token, -1 = no adapter.
        ranks: [num_slots] int32/int64, rank of each slot (clamped to max_rank).
    """
    check_dim("t", t, 2, "[num_tokens, max_rank]")
    check_dim("lora_b", lora_b, 3, "[num_slots, out_features, max_rank]")
    check_dim("y", y, 2, "[num_tokens, out_features]")
    check_dim("token_slots", token_slots, 1, "[num_tokens]")
    check_dtype("t", t, (torch.float32,))
    check_dtype("lora_b", lora_b, FLOAT_DTYPES)
    check_dtype("y", y, (lora_b.dtype,))
    check_dtype("token_slots", token_slots, INDEX_DTYPES)
    check_dtype("ranks", ranks, INDEX_DTYPES)
    check_same_device(t=t, lora_b=lora_b, y=y, token_slots=token_slots, ranks=ranks)
    num_slots, out_features, max_rank = lora_b.shape
    num_tokens = y.shape[0]
    check_size("t", t.shape[0], num_tokens, "rows (tokens of y)")
    check_size("t", t.shape[1], max_rank, "columns (lora_b max_rank)")
    check_size("y", y.shape[1], out_features, "columns (lora_b out_features)")
    check_size("token_slots", token_slots.shape[0], num_tokens, "entries (tokens of y)")
    check_size("ranks", ranks.shape[0], num_slots, "entries (slots)")
    check_contiguous("t", t)
    check_contiguous("lora_b", lora_b)
    check_contiguous("token_slots", token_slots)
    check_rows_unit_stride("y", y)
    if num_tokens == 0 or max_rank == 0:
        return

    block_r = triton.next_power_of_2(max_rank)
    block_n = max(16, min(_TILE_ELEMENTS // block_r, triton.next_power_of_2(out_features)))
    # Narrower tiles for small batches, so a decode step of a few tokens still fills the GPU.
    while block_n > 32 and num_tokens * triton.cdiv(out_features, block_n) < _TARGET_PROGRAMS:
        block_n //= 2
    grid = (num_tokens, triton.cdiv(out_features, block_n))
    runnable(_bgmv_expand_kernel, y)[grid](
        t,
        lora_b,
        y,
        token_slots,
        ranks,
        out_features,
        max_rank,
        t.stride(0),
        lora_b.stride(0),
        lora_b.stride(1),
        y.stride(0),
        BLOCK_N=block_n,
        BLOCK_R=block_r,
    )
