"""SGMV expand: add each prefill segment's rank-space activations times LoRA B to the output."""

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
from kernels.launch import check_grid_segments, rank_block, runnable


@triton.jit
def _sgmv_expand_kernel(
    t_ptr,
    b_ptr,
    y_ptr,
    seg_starts_ptr,
    seg_lens_ptr,
    seg_slots_ptr,
    ranks_ptr,
    out_features,
    max_rank,
    stride_tm,
    stride_b_slot,
    stride_bn,
    stride_ym,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    seg = tl.program_id(2)
    seg_len = tl.load(seg_lens_ptr + seg)
    if pid_m * BLOCK_M >= seg_len:
        return
    slot = tl.load(seg_slots_ptr + seg).to(tl.int64)
    if slot < 0:
        return
    rank = tl.minimum(tl.load(ranks_ptr + slot), max_rank)
    start = tl.load(seg_starts_ptr + seg).to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    row_ok = offs_m < seg_len
    col_ok = offs_n < out_features
    rank_ok = offs_r < rank  # columns of B past the slot's rank are padding: never loaded

    t_tile = tl.load(
        t_ptr + (start + offs_m)[:, None] * stride_tm + offs_r[None, :],
        mask=row_ok[:, None] & rank_ok[None, :],
        other=0.0,
    )
    b_tile = tl.load(
        b_ptr + slot * stride_b_slot + offs_n[None, :] * stride_bn + offs_r[:, None],
        mask=rank_ok[:, None] & col_ok[None, :],
        other=0.0,
    )
    # Half-precision weights multiply on tensor cores; the sum itself stays float32.
    delta = tl.dot(t_tile.to(b_tile.dtype), b_tile, input_precision=DOT_PRECISION)

    y_ptrs = y_ptr + (start + offs_m)[:, None] * stride_ym + offs_n[None, :]
    y_mask = row_ok[:, None] & col_ok[None, :]
    y_tile = tl.load(y_ptrs, mask=y_mask, other=0.0)
    tl.store(y_ptrs, (y_tile.to(tl.float32) + delta).to(y_tile.dtype), mask=y_mask)


def sgmv_expand(
    t: Tensor,
    lora_b: Tensor,
    y: Tensor,
    seg_starts: Tensor,
    seg_lens: Tensor,
    seg_slots: Tensor,
    max_seg_len: int,
    ranks: Tensor,
) -> None:
    """Add t @ B.T of every segment's slot to y, in place.

    Semantics:
        for g in range(num_segments):
            s, r = seg_slots[g], ranks[seg_slots[g]]
            for i in range(seg_starts[g], seg_starts[g] + seg_lens[g]):
                y[i] += t[i, :r] @ lora_b[s, :, :r].T
        Rows outside segments are neither read nor written.

    Args:
        t: [num_tokens, max_rank] float32 contiguous (the output of sgmv_shrink).
        lora_b: [num_slots, out_features, max_rank] float32/float16/bfloat16 contiguous.
        y: [num_tokens, out_features] dtype of lora_b, updated in place; each row dense.
        seg_starts: [num_segments] int32, first token of each segment.
        seg_lens: [num_segments] int32, tokens in each segment.
        seg_slots: [num_segments] int32, slot of each segment (segments with -1 are skipped).
        max_seg_len: max(seg_lens) as a host int (sizes the grid without a device sync).
        ranks: [num_slots] int32/int64, rank of each slot (clamped to max_rank).
    """
    check_dim("t", t, 2, "[num_tokens, max_rank]")
    check_dim("lora_b", lora_b, 3, "[num_slots, out_features, max_rank]")
    check_dim("y", y, 2, "[num_tokens, out_features]")
    check_dtype("t", t, (torch.float32,))
    check_dtype("lora_b", lora_b, FLOAT_DTYPES)
    check_dtype("y", y, (lora_b.dtype,))
    for name, s in (("seg_starts", seg_starts), ("seg_lens", seg_lens), ("seg_slots", seg_slots)):
        check_dim(name, s, 1, "[num_segments]")
        check_dtype(name, s, (torch.int32,))
        check_size(name, s.shape[0], seg_starts.shape[0], "entries (segments)")
    check_dtype("ranks", ranks, INDEX_DTYPES)
    check_same_device(t=t, lora_b=lora_b, y=y, seg_starts=seg_starts, ranks=ranks)
    num_slots, out_features, max_rank = lora_b.shape
    check_size("t", t.shape[0], y.shape[0], "rows (tokens of y)")
    check_size("t", t.shape[1], max_rank, "columns (lora_b max_rank)")
    check_size("y", y.shape[1], out_features, "columns (lora_b out_features)")
    check_size("ranks", ranks.shape[0], num_slots, "entries (slots)")
    check_contiguous("t", t)
    check_contiguous("lora_b", lora_b)
    check_rows_unit_stride("y", y)
    num_segments = seg_starts.shape[0]
    if num_segments == 0 or max_seg_len <= 0 or max_rank == 0:
        return
    check_grid_segments(num_segments)

    block_m = 16 if max_seg_len <= 16 else (32 if max_seg_len <= 32 else 64)
    block_r = rank_block(max_rank)
    block_n = 32 if out_features <= 32 else (64 if block_m < 64 else 128)
    grid = (triton.cdiv(max_seg_len, block_m), triton.cdiv(out_features, block_n), num_segments)
    runnable(_sgmv_expand_kernel, y)[grid](
        t,
        lora_b,
        y,
        seg_starts,
        seg_lens,
        seg_slots,
        ranks,
        out_features,
        max_rank,
        t.stride(0),
        lora_b.stride(0),
        lora_b.stride(1),
        y.stride(0),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_R=block_r,
        DOT_PRECISION="ieee" if y.dtype == torch.float32 else "tf32",
    )
