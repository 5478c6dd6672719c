"""The one entry point the model calls: add the LoRA delta of a mixed-adapter batch to y.

Backend choice: Triton kernels for CUDA tensors, the PyTorch paths for CPU tensors.
`backend="triton"` (or the `use_backend("triton")` context) forces the kernels on CPU tensors
too, where they run under Triton's interpreter; tests use this to check the kernels without a
GPU.

`add_lora` checks every input on every call. `add_lora_trusted` skips the checks for callers
that own their tensors and validated them once (the model's slot pools check ranks when a slot
is written and slots when a batch is built); on small CPU models the per-call checks cost as
much as the LoRA arithmetic.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Literal

import torch
from torch import Tensor

from kernels.batch import LoraBatch, Segments
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
from kernels.torch_path import SlotViews, add_lora_torch

Backend = Literal["auto", "torch", "triton"]
BACKENDS: tuple[str, ...] = ("auto", "torch", "triton")

_forced_backend: ContextVar[Backend] = ContextVar("lora_backend", default="auto")

__all__ = [
    "BACKENDS",
    "Backend",
    "LoraBatch",
    "Segments",
    "add_lora",
    "add_lora_trusted",
    "use_backend",
]


@contextmanager
def use_backend(backend: Backend) -> Iterator[None]:
    """Within the block, add_lora calls without an explicit backend use `backend`."""
    _check_backend(backend)
    token = _forced_backend.set(backend)
    try:
        yield
    finally:
        _forced_backend.reset(token)


def add_lora(
    y: Tensor,
    x: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    ranks: Tensor,
    scales: Tensor,
    batch: LoraBatch,
    backend: Backend | None = None,
) -> None:
    """Add the LoRA delta of every token's adapter slot to y, in place.

    Semantics:
        for i in range(num_tokens):
            s = batch.token_slots[i]
            if s < 0: continue                      # no adapter in this pool: row untouched
            r = ranks[s]
            y[i] += scales[s] * (x[i] @ lora_a[s, :r, :].T) @ lora_b[s, :, :r].T

    Args:
        y: [num_tokens, out_features] float32/float16/bfloat16, updated in place; rows may be
            strided (e.g. a column slice of a fused projection) but each row must be dense.
        x: [num_tokens, in_features], same dtype as y, each row dense.
        lora_a: [num_slots, max_rank, in_features] contiguous (peft lora_A.weight per slot).
        lora_b: [num_slots, out_features, max_rank] contiguous (peft lora_B.weight per slot).
        ranks: [num_slots] int32, true rank of each slot (<= max_rank); padding is never read.
        scales: [num_slots] float32, lora_alpha / r per slot.
        batch: slots per token (and prefill segments), built once per forward pass.
        backend: "auto" (Triton on CUDA, torch on CPU), "torch" or "triton"; None defers to
            `use_backend`, default "auto".
    """
    _check_inputs(y, x, lora_a, lora_b, ranks, scales, batch)
    if backend is not None:
        _check_backend(backend)
    add_lora_trusted(y, x, lora_a, lora_b, ranks, scales, batch, backend=backend)


def add_lora_trusted(
    y: Tensor,
    x: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    ranks: Tensor,
    scales: Tensor,
    batch: LoraBatch,
    *,
    host_ranks: Sequence[int] | None = None,
    host_scales: Sequence[float] | None = None,
    slot_views: SlotViews | None = None,
    backend: Backend | None = None,
) -> None:
    """`add_lora` without the input checks, for callers that validated their inputs once.

    The caller guarantees everything `add_lora` checks: shapes, dtypes, one device, dense rows,
    contiguous pools, slots of `batch` inside the pool and ranks in [0, max_rank].
    `host_ranks` / `host_scales`, host copies of `ranks` / `scales` kept by the caller, spare
    the CPU path two device reads per call; `slot_views[s]`, views `(lora_a[s, :r],
    lora_b[s, :, :r].T)` of each occupied slot (None for empty ones), spare it slicing the pool
    per slot. The Triton kernels ignore the three.
    """
    if batch.num_active == 0:
        return
    chosen = _forced_backend.get() if backend is None else backend
    if chosen == "torch" or (chosen == "auto" and not y.is_cuda):
        add_lora_torch(
            y,
            x,
            lora_a,
            lora_b,
            ranks,
            scales,
            batch,
            host_ranks=host_ranks,
            host_scales=host_scales,
            slot_views=slot_views,
        )
    else:
        _add_lora_triton(y, x, lora_a, lora_b, ranks, scales, batch)


def _add_lora_triton(
    y: Tensor,
    x: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    ranks: Tensor,
    scales: Tensor,
    batch: LoraBatch,
) -> None:
    # Imported here so CPU serving never pays for importing Triton.
    from kernels.bgmv_expand import bgmv_expand
    from kernels.bgmv_shrink import bgmv_shrink
    from kernels.sgmv_expand import sgmv_expand
    from kernels.sgmv_shrink import sgmv_shrink

    # Scaled shrink output stays in float32 between the two kernels. Rows of inactive tokens and
    # columns beyond a slot's rank are never written and never read.
    shrunk = torch.empty(x.shape[0], lora_a.shape[1], dtype=torch.float32, device=x.device)
    seg = batch.segments
    if seg is not None:
        sgmv_shrink(
            x,
            lora_a,
            shrunk,
            seg.seg_starts,
            seg.seg_lens,
            seg.seg_slots,
            seg.max_seg_len,
            ranks,
            scales,
        )
        sgmv_expand(
            shrunk, lora_b, y, seg.seg_starts, seg.seg_lens, seg.seg_slots, seg.max_seg_len, ranks
        )
    else:
        bgmv_shrink(x, lora_a, shrunk, batch.token_slots, ranks, scales)
        bgmv_expand(shrunk, lora_b, y, batch.token_slots, ranks)


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown LoRA backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def _check_inputs(
    y: Tensor,
    x: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    ranks: Tensor,
    scales: Tensor,
    batch: LoraBatch,
) -> None:
    check_dim("y", y, 2, "[num_tokens, out_features]")
    check_dim("x", x, 2, "[num_tokens, in_features]")
    check_dim("lora_a", lora_a, 3, "[num_slots, max_rank, in_features]")
    check_dim("lora_b", lora_b, 3, "[num_slots, out_features, max_rank]")
    check_dim("ranks", ranks, 1, "[num_slots]")
    check_dim("scales", scales, 1, "[num_slots]")
    check_dtype("y", y, FLOAT_DTYPES)
    check_same_dtype(y=y, x=x, lora_a=lora_a, lora_b=lora_b)
    check_dtype("ranks", ranks, INDEX_DTYPES)
    check_dtype("scales", scales, (torch.float32,))
    check_same_device(
        y=y,
        x=x,
        lora_a=lora_a,
        lora_b=lora_b,
        ranks=ranks,
        scales=scales,
        token_slots=batch.token_slots,
    )
    num_tokens = batch.num_tokens
    check_size("x", x.shape[0], num_tokens, "rows (tokens in the LoraBatch)")
    check_size("y", y.shape[0], num_tokens, "rows (tokens in the LoraBatch)")
    num_slots, max_rank, in_features = lora_a.shape
    check_size("x", x.shape[1], in_features, "columns (lora_a in_features)")
    check_size("lora_b", lora_b.shape[0], num_slots, "slots (lora_a slots)")
    check_size("lora_b", lora_b.shape[1], y.shape[1], "rows (y out_features)")
    check_size("lora_b", lora_b.shape[2], max_rank, "rank columns (lora_a max_rank)")
    check_size("ranks", ranks.shape[0], num_slots, "entries (slots in the pool)")
    check_size("scales", scales.shape[0], num_slots, "entries (slots in the pool)")
    check_rows_unit_stride("y", y)
    check_rows_unit_stride("x", x)
    check_contiguous("lora_a", lora_a)
    check_contiguous("lora_b", lora_b)
    if batch.max_slot >= num_slots:
        raise ValueError(f"token slot {batch.max_slot} is out of range for a pool of {num_slots}")
    # On CUDA this would cost a sync per layer; the kernels clamp ranks to max_rank instead.
    if not ranks.is_cuda and ranks.numel():
        low, high = int(ranks.min()), int(ranks.max())
        if low < 0 or high > max_rank:
            raise ValueError(
                f"ranks must lie in [0, {max_rank}] (the pool's max_rank), got {low}..{high}"
            )
