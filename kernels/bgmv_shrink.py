"""BGMV shrink: project each decode token onto its own adapter's LoRA A (x -> rank space)."""

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
from kernels.launch import runnable, split_k_for

# Elements of the A tile one program holds at a time (BLOCK_R * BLOCK_K).
_TILE_ELEMENTS = 8192


@triton.jit
def _bgmv_shrink_kernel(
    x_ptr,
    a_ptr,
    out_ptr,
    token_slots_ptr,
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
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    pid_k = tl.program_id(1)
    slot = tl.load(token_slots_ptr + token).to(tl.int64)
    if slot < 0:
        return
    rank = tl.minimum(tl.load(ranks_ptr + slot), max_rank)

    offs_r = tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    rank_ok = offs_r < rank  # rows of A past the slot's rank are padding: never loaded
    k_begin = pid_k * k_per_split
    k_end = tl.minimum(k_begin + k_per_split, in_features)

    x_ptrs = x_ptr + token * stride_xm + k_begin + offs_k
    a_ptrs = (
        a_ptr + slot * stride_a_slot + offs_r[:, None] * stride_a_rank + (k_begin + offs_k)[None, :]
    )
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    for k in range(k_begin, k_end, BLOCK_K):
        k_ok = k + offs_k < k_end
        x_vec = tl.load(x_ptrs, mask=k_ok, other=0.0).to(tl.float32)
        a_tile = tl.load(a_ptrs, mask=rank_ok[:, None] & k_ok[None, :], other=0.0)
        acc += a_tile.to(tl.float32) * x_vec[None, :]
        x_ptrs += BLOCK_K
        a_ptrs += BLOCK_K
    # One cross-lane reduction at the end instead of one per K step.
    shrunk = tl.sum(acc, axis=1) * tl.load(scales_ptr + slot)
    tl.store(
        out_ptr + pid_k * stride_out_split + token * stride_out_m + offs_r, shrunk, mask=rank_ok
    )


@triton.jit
def _bgmv_sum_splits_kernel(
    partial_ptr,
    out_ptr,
    token_slots_ptr,
    ranks_ptr,
    max_rank,
    split_k,
    stride_partial_split,
    stride_m,
    BLOCK_R: tl.constexpr,
):
    # Sums the split-K slices into exactly the entries the unsplit kernel would store, so rows
    # of tokens without an adapter and columns past a slot's rank keep whatever `out` held.
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(token_slots_ptr + token).to(tl.int64)
    if slot < 0:
        return
    rank = tl.minimum(tl.load(ranks_ptr + slot), max_rank)

    offs_r = tl.arange(0, BLOCK_R)
    rank_ok = offs_r < rank
    partial_ptrs = partial_ptr + token * stride_m + offs_r
    total = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for _ in range(split_k):
        total += tl.load(partial_ptrs, mask=rank_ok, other=0.0)
        partial_ptrs += stride_partial_split
    tl.store(out_ptr + token * stride_m + offs_r, total, mask=rank_ok)


def bgmv_shrink(
    x: Tensor,
    lora_a: Tensor,
    out: Tensor,
    token_slots: Tensor,
    ranks: Tensor,
    scales: Tensor,
) -> None:
    """Scaled LoRA-A projection of every token through its own slot, written to `out` (float32).

    Semantics:
        for i in range(num_tokens):
            s = token_slots[i]
            if s < 0: continue
            r = ranks[s]
            out[i, :r] = scales[s] * (x[i] @ lora_a[s, :r, :].T)
        Every other entry of `out` (rows with slot -1, columns >= r) is left untouched, also
        when the reduction is split over programs.

    Args:
        x: [num_tokens, in_features] float32/float16/bfloat16, each row dense.
        lora_a: [num_slots, max_rank, in_features] contiguous, dtype of x.
        out: [num_tokens, max_rank] float32 contiguous.
        token_slots: [num_tokens] int32/int64, slot per token, -1 = no adapter.
        ranks: [num_slots] int32/int64, rank of each slot (clamped to max_rank).
        scales: [num_slots] float32.
    """
    check_dim("x", x, 2, "[num_tokens, in_features]")
    check_dim("lora_a", lora_a, 3, "[num_slots, max_rank, in_features]")
    check_dim("out", out, 2, "[num_tokens, max_rank]")
    check_dim("token_slots", token_slots, 1, "[num_tokens]")
    check_dtype("x", x, FLOAT_DTYPES)
    check_same_dtype(x=x, lora_a=lora_a)
    check_dtype("out", out, (torch.float32,))
    check_dtype("token_slots", token_slots, INDEX_DTYPES)
    check_dtype("ranks", ranks, INDEX_DTYPES)
    check_dtype("scales", scales, (torch.float32,))
    check_same_device(
        x=x, lora_a=lora_a, out=out, token_slots=token_slots, ranks=ranks, scales=scales
    )
    num_slots, max_rank, in_features = lora_a.shape
    num_tokens = x.shape[0]
    check_size("x", x.shape[1], in_features, "columns (lora_a in_features)")
    check_size("token_slots", token_slots.shape[0], num_tokens, "entries (tokens of x)")
    check_size("out", out.shape[0], num_tokens, "rows (tokens of x)")
    check_size("out", out.shape[1], max_rank, "columns (lora_a max_rank)")
    check_size("ranks", ranks.shape[0], num_slots, "entries (slots)")
    check_size("scales", scales.shape[0], num_slots, "entries (slots)")
    check_rows_unit_stride("x", x)
    check_contiguous("lora_a", lora_a)
    check_contiguous("out", out)
    check_contiguous("token_slots", token_slots)
    if num_tokens == 0 or max_rank == 0:
        return

    block_r = triton.next_power_of_2(max_rank)
    block_k = min(max(16, _TILE_ELEMENTS // block_r), max(16, triton.next_power_of_2(in_features)))
    k_blocks = triton.cdiv(in_features, block_k)
    split_k = split_k_for(num_tokens, k_blocks)
    k_per_split = triton.cdiv(k_blocks, split_k) * block_k
    split_k = triton.cdiv(in_features, k_per_split)
    # Split-K programs write float32 partials, summed into `out` by a second launch.
    partial = out if split_k == 1 else out.new_empty(split_k, *out.shape)

    runnable(_bgmv_shrink_kernel, x)[(num_tokens, split_k)](
        x,
        lora_a,
        partial,
        token_slots,
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
        BLOCK_R=block_r,
        BLOCK_K=block_k,
    )
    if split_k > 1:
        runnable(_bgmv_sum_splits_kernel, x)[(num_tokens,)](
            partial,
            out,
            token_slots,
            ranks,
            max_rank,
            split_k,
            partial.stride(0),
            out.stride(0),
            BLOCK_R=block_r,
        )
