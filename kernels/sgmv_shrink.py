"""SGMV shrink: project each prefill segment onto its adapter's LoRA A (x -> rank space)."""

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
    check_same_dtype,
    check_size,
)
from kernels.launch import check_grid_segments, rank_block, runnable, split_k_for


@triton.jit
def _sgmv_shrink_kernel(
    x_ptr,
    a_ptr,
    out_ptr,
    seg_starts_ptr,
    seg_lens_ptr,
    seg_slots_ptr,
    ranks_ptr,
    scales_ptr,
    in_features,
    max_rank,
    k_per_split,
    stride_xm,
    stride_a_slot,
    stride_a_rank,
    stride_out_split,
    stride_out_m,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
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
    offs_r = tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    row_ok = offs_m < seg_len
    rank_ok = offs_r < rank  # rows of A past the slot's rank are padding: never loaded
    k_begin = pid_k * k_per_split
    k_end = tl.minimum(k_begin + k_per_split, in_features)

    x_ptrs = x_ptr + (start + offs_m)[:, None] * stride_xm + (k_begin + offs_k)[None, :]
    a_ptrs = (
        a_ptr + slot * stride_a_slot + offs_r[None, :] * stride_a_rank + (k_begin + offs_k)[:, None]
    )
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k in range(k_begin, k_end, BLOCK_K):
        k_ok = k + offs_k < k_end
        x_tile = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        a_tile = tl.load(a_ptrs, mask=k_ok[:, None] & rank_ok[None, :], other=0.0)
        acc += tl.dot(x_tile, a_tile, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K
        a_ptrs += BLOCK_K
    acc *= tl.load(scales_ptr + slot)

    out_ptrs = (
        out_ptr
        + pid_k * stride_out_split
        + (start + offs_m)[:, None] * stride_out_m
        + offs_r[None, :]
    )
    tl.store(out_ptrs, acc, mask=row_ok[:, None] & rank_ok[None, :])


@triton.jit
def _sgmv_sum_splits_kernel(
    partial_ptr,
    out_ptr,
    seg_starts_ptr,
    seg_lens_ptr,
    seg_slots_ptr,
    ranks_ptr,
    max_rank,
    split_k,
    stride_partial_split,
    stride_m,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    # Sums the split-K slices into exactly the entries the unsplit kernel would store, so rows
    # outside segments and columns past a slot's rank keep whatever `out` held.
    pid_m = tl.program_id(0)
    seg = tl.program_id(1)
    seg_len = tl.load(seg_lens_ptr + seg)
    if pid_m * BLOCK_M >= seg_len:
        return
    slot = tl.load(seg_slots_ptr + seg).to(tl.int64)
    if slot < 0:
        return
    rank = tl.minimum(tl.load(ranks_ptr + slot), max_rank)
    start = tl.load(seg_starts_ptr + seg).to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    mask = (offs_m < seg_len)[:, None] & (offs_r < rank)[None, :]
    offsets = (start + offs_m)[:, None] * stride_m + offs_r[None, :]
    partial_ptrs = partial_ptr + offsets
    total = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for _ in range(split_k):
        total += tl.load(partial_ptrs, mask=mask, other=0.0)
        partial_ptrs += stride_partial_split
    tl.store(out_ptr + offsets, total, mask=mask)


def sgmv_shrink(
    x: Tensor,
    lora_a: Tensor,
    out: Tensor,
    seg_starts: Tensor,
    seg_lens: Tensor,
    seg_slots: Tensor,
    max_seg_len: int,
    ranks: Tensor,
    scales: Tensor,
) -> None:
    """Scaled LoRA-A projection of every segment, written to `out` (float32).

    Semantics:
        for g in range(num_segments):
            s, r = seg_slots[g], ranks[seg_slots[g]]
            for i in range(seg_starts[g], seg_starts[g] + seg_lens[g]):
                out[i, :r] = scales[s] * (x[i] @ lora_a[s, :r, :].T)
        Every other entry of `out` (rows outside segments, such as tokens without an adapter,
        and columns >= r) is left untouched, also when the reduction is split over programs.

    Args:
        x: [num_tokens, in_features] float32/float16/bfloat16, each row dense.
        lora_a: [num_slots, max_rank, in_features] contiguous, dtype of x.
        out: [num_tokens, max_rank] float32 contiguous.
        seg_starts: [num_segments] int32, first token of each segment.
        seg_lens: [num_segments] int32, tokens in each segment.
        seg_slots: [num_segments] int32, slot of each segment (segments with -1 are skipped).
        max_seg_len: max(seg_lens) as a host int (sizes the grid without a device sync).
        ranks: [num_slots] int32/int64, rank of each slot (clamped to max_rank).
        scales: [num_slots] float32.
    """
    check_dim("x", x, 2, "[num_tokens, in_features]")
    check_dim("lora_a", lora_a, 3, "[num_slots, max_rank, in_features]")
    check_dim("out", out, 2, "[num_tokens, max_rank]")
    check_dtype("x", x, FLOAT_DTYPES)
    check_same_dtype(x=x, lora_a=lora_a)
    check_dtype("out", out, (torch.float32,))
    for name, t in (("seg_starts", seg_starts), ("seg_lens", seg_lens), ("seg_slots", seg_slots)):
        check_dim(name, t, 1, "[num_segments]")
        check_dtype(name, t, (torch.int32,))
        check_size(name, t.shape[0], seg_starts.shape[0], "entries (segments)")
    check_dtype("ranks", ranks, INDEX_DTYPES)
    check_dtype("scales", scales, (torch.float32,))
    check_same_device(
        x=x, lora_a=lora_a, out=out, seg_starts=seg_starts, ranks=ranks, scales=scales
    )
    num_slots, max_rank, in_features = lora_a.shape
    check_size("x", x.shape[1], in_features, "columns (lora_a in_features)")
    check_size("out", out.shape[0], x.shape[0], "rows (tokens of x)")
    check_size("out", out.shape[1], max_rank, "columns (lora_a max_rank)")
    check_size("ranks", ranks.shape[0], num_slots, "entries (slots)")
    check_size("scales", scales.shape[0], num_slots, "entries (slots)")
    check_rows_unit_stride("x", x)
    check_contiguous("lora_a", lora_a)
    check_contiguous("out", out)
    num_segments = seg_starts.shape[0]
    if num_segments == 0 or max_seg_len <= 0 or max_rank == 0:
        return
    check_grid_segments(num_segments)

    block_m = 16 if max_seg_len <= 16 else (32 if max_seg_len <= 32 else 64)
    block_r = rank_block(max_rank)
    block_k = 32 if in_features <= 32 else (64 if block_r >= 64 else 128)
    m_blocks = triton.cdiv(max_seg_len, block_m)
    k_blocks = triton.cdiv(in_features, block_k)
    split_k = split_k_for(m_blocks * num_segments, k_blocks)
    k_per_split = triton.cdiv(k_blocks, split_k) * block_k
    split_k = triton.cdiv(in_features, k_per_split)
    # Split-K programs write float32 partials, summed into `out` by a second launch.
    partial = out if split_k == 1 else out.new_empty(split_k, *out.shape)

    grid = (m_blocks, split_k, num_segments)
    runnable(_sgmv_shrink_kernel, x)[grid](
        x,
        lora_a,
        partial,
        seg_starts,
        seg_lens,
        seg_slots,
        ranks,
        scales,
        in_features,
        max_rank,
        k_per_split,
        x.stride(0),
        lora_a.stride(0),
        lora_a.stride(1),
        partial.stride(0) if split_k > 1 else 0,
        partial.stride(-2),
        BLOCK_M=block_m,
        BLOCK_R=block_r,
        BLOCK_K=block_k,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
    )
    if split_k > 1:
        runnable(_sgmv_sum_splits_kernel, x)[(m_blocks, num_segments)](
            partial,
            out,
            seg_starts,
            seg_lens,
            seg_slots,
            ranks,
            max_rank,
            split_k,
            partial.stride(0),
            out.stride(0),
            BLOCK_M=block_m,
            BLOCK_R=block_r,
        )
