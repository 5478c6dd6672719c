"""Fast PyTorch paths for the LoRA delta: what serving on the CPU runs.

Two strategies, picked per call by how many distinct slots the batch holds:

- grouped: one matmul pair per distinct slot, `y[rows] += scale * (x[rows] @ A[:r].T) @ B[:, :r].T`
  reading only the first r rows of A and columns of B. Best for prefill (long runs of one
  adapter) and for decode batches with few adapters.
- gathered: decode tokens bucketed by rank; per bucket each token's `A[:r]` and `B[:, :r]` are
  gathered and applied with two batched matmuls. A fixed handful of ops however many slots, so
  it wins once per-slot dispatch dominates (many adapters, a few tokens each).

Both read no padding beyond a slot's rank, compute in float32 and round into y once. Grouping
and bucketing are cached on the LoraBatch, so every layer of a forward pass reuses them.

Fused pools (`add_fused_lora`, the CPU serving layout) stack the A of a fused layer's members
and keep each member's B transposed on its own. A decode batch is applied stacked unless its
active slots lie so far apart in the pool that reading the slots between them costs more than
per-slot calls would (`OP_COST_ELEMENTS`): one shrink of every token against the whole run of
slots from the first active to the last, a mask that keeps each token's own slot, and one
expand per member against that run's B. With one token per adapter, the usual decode batch,
that is 1 + 2 * members ops per fused layer instead of (1 + members) per slot, and each matmul
reads a long contiguous run of weights, which a single core streams several times faster
than many short ones. The shrink's extra multiplies (every token times every slot of the run)
cost little next to reading the weights, which the run reads once. Scattered slots that are
small (a tiny model's) are gathered as in the unfused layout, a fixed handful of ops however
many slots; large scattered slots and prefill go slot by slot.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels.batch import GatherBucket, LoraBatch

# Per slot: (A[:r] [r, in_features], B[:, :r].T [r, out_features]) views, None for an empty slot.
SlotViews = Sequence[tuple[Tensor, Tensor] | None]

# When a decode batch is gathered instead of looped over. Chosen by timing whole decode passes
# of the multi-LoRA engine on one CPU thread (32 tokens, ~20 adapters in three rank-class pools,
# fused projections, hidden 64 and 128): gathering only the small slots (A and B together at
# most ~4k elements: rank-8/16 o_proj and down_proj, rank-8 q|k|v at hidden 64) beat looping
# over every slot by ~15-20% of the pass, while gathering larger slots lost, because its copy
# of each token's A and B costs more than the per-slot matmul dispatch it saves. In isolated
# single-call timings gathering looked better up to ~16k elements; the whole pass disagrees.
GATHER_MIN_SLOTS = 3
GATHER_MAX_SLOT_ELEMENTS = 4096
# One torch op on one CPU core costs about as long as streaming this many weight elements
# (a few microseconds of dispatch against ~6 GB/s of matmul reads): the exchange rate of the
# fused path's choice between reading the whole run of slots once (stacked, a fixed handful of
# ops) and going slot by slot (a few ops per slot, active slots' weights only).
OP_COST_ELEMENTS = 8192

# Per member of a fused layer: (its columns of the layer's output, its B transposed
# [num_slots, rank_class, width], scale folded in).
MemberB = Sequence[tuple[slice, Tensor]]


def add_lora_torch(
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
    gather_min_slots: int = GATHER_MIN_SLOTS,
    gather_max_slot_elements: int = GATHER_MAX_SLOT_ELEMENTS,
) -> None:
    """y[i] += scales[s] * (x[i] @ lora_a[s, :r].T) @ lora_b[s, :, :r].T for tokens with s >= 0.

    Shapes as in `kernels.dispatch.add_lora`; inputs are assumed checked by the caller.
    `host_ranks` / `host_scales` are host copies of `ranks` / `scales` when the caller keeps
    them (saves two device reads per call); `slot_views`, views of each slot's weights cut to
    its rank, save slicing the pool per slot and call. Decode batches (no segments) with at least
    `gather_min_slots` distinct slots whose padded A and B hold at most
    `gather_max_slot_elements` elements take the gathered path.
    """
    if batch.num_active == 0:
        return
    rank_of = ranks.tolist() if host_ranks is None else host_ranks
    slot_elements = lora_a.shape[1] * (lora_a.shape[2] + lora_b.shape[1])
    if (
        batch.segments is None
        and batch.num_active_slots >= gather_min_slots
        and slot_elements <= gather_max_slot_elements
    ):
        _add_gathered(y, x, lora_a, lora_b, scales, batch, rank_of, host_scales)
        return
    scale_of = scales.tolist() if host_scales is None else host_scales
    _add_grouped(y, x, lora_a, lora_b, batch, rank_of, scale_of, slot_views)


def _add_grouped(
    y: Tensor,
    x: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    batch: LoraBatch,
    rank_of: Sequence[int],
    scale_of: Sequence[float],
    slot_views: SlotViews | None,
) -> None:
    exact_dtype = y.dtype == torch.float32
    for slot, rows in batch.slot_rows():
        rank = rank_of[slot]
        if rank == 0:
            continue
        views = None if slot_views is None else slot_views[slot]
        if views is None:
            a, b_t = lora_a[slot, :rank], lora_b[slot, :, :rank].t()
        else:
            a, b_t = views  # [r, in_features], [r, out_features]
        if exact_dtype:
            shrunk = F.linear(x[rows], a)  # [n, r]
            if isinstance(rows, slice):
                # GEMM accumulates into y's rows directly, the scale folded into alpha.
                y[rows].addmm_(shrunk, b_t, alpha=scale_of[slot])
            else:
                y.index_add_(0, rows, shrunk @ b_t, alpha=scale_of[slot])
            continue
        # Half precision: compute in float32 and round into y once, as the kernels do.
        shrunk = F.linear(x[rows].float(), a.float())
        delta = torch.addmm(
            y[rows].float(), shrunk, b_t.float(), alpha=scale_of[slot]
        )  # [n, out_features]
        if isinstance(rows, slice):
            y[rows] = delta.to(y.dtype)
        else:
            y.index_copy_(0, rows, delta.to(y.dtype))


def _add_gathered(
    y: Tensor,
    x: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    scales: Tensor,
    batch: LoraBatch,
    rank_of: Sequence[int],
    scale_of: Sequence[float] | None,
) -> None:
    # Scales of 1 (fused params fold them into B) skip a gather and a multiply.
    unit_scales = scale_of is not None and all(scale_of[s] == 1.0 for s in batch.active_slots)
    for bucket in batch.gather_buckets(rank_of):
        _add_bucket(y, x, lora_a, lora_b, scales, bucket, unit_scales)


def _add_bucket(
    y: Tensor,
    x: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    scales: Tensor,
    bucket: GatherBucket,
    unit_scales: bool,
) -> None:
    rank, rows, slots = bucket.rank, bucket.rows, bucket.slots
    # Slicing before the gather copies only the first `rank` rows / columns: padding stays
    # unread. A full-rank bucket (the usual case in a pool of one rank class) gathers the
    # contiguous pool directly, a plain block copy.
    full_rank = rank == lora_a.shape[1]
    a = (lora_a if full_rank else lora_a[:, :rank]).index_select(0, slots)  # [k, r, in]
    b = (lora_b if full_rank else lora_b[:, :, :rank]).index_select(0, slots)  # [k, out, r]
    rows_x = x[rows]  # [k, in_features]
    exact_dtype = y.dtype == torch.float32
    if not exact_dtype:
        a, b, rows_x = a.float(), b.float(), rows_x.float()
    shrunk = torch.bmm(a, rows_x.unsqueeze(2))  # [k, r, 1]
    if not unit_scales:
        shrunk.mul_(scales.index_select(0, slots).view(-1, 1, 1))
    if exact_dtype and isinstance(rows, slice):
        # The expand accumulates straight into y's rows: no delta tensor, no extra add.
        y[rows].unsqueeze(2).baddbmm_(b, shrunk)
        return
    delta = torch.bmm(b, shrunk).squeeze(2)  # [k, out_features]
    if exact_dtype:
        y.index_add_(0, rows, delta)
        return
    updated = (y[rows].float() + delta).to(y.dtype)
    if isinstance(rows, slice):
        y[rows] = updated
    else:
        y.index_copy_(0, rows, updated)


def add_fused_lora(
    y: Tensor,
    x: Tensor,
    lora_a: Tensor,
    member_b: MemberB,
    member_ranks: Sequence[Sequence[int]],
    batch: LoraBatch,
) -> None:
    """y[i, cols_m] += (x[i] @ A[s, m-th rank block].T) @ B_m[s] for every member m of a fused
    layer and every token i with slot s >= 0.

    lora_a [num_slots, members * rank_class, in_features] holds member m's A in rows
    [m * rank_class, m * rank_class + r_m), zero beyond; `member_ranks[s]` is the host list of
    r_m. Inputs are trusted, as the pool that owns them validated them on write. The matmuls
    run in the pool's dtype (BLAS accumulates in float32; in half precision the [n, rank]
    shrink rounds once before the expand, as peft's does).
    """
    if batch.num_active == 0:
        return
    if batch.segments is None:
        first, span = batch.slot_span
        members = len(member_b)
        slot_elements = lora_a[0].numel() + sum(b[0].numel() for _, b in member_b)
        stacked = span * slot_elements + (1 + 2 * members) * OP_COST_ELEMENTS
        per_slot = batch.num_active_slots * (slot_elements + (1 + members) * OP_COST_ELEMENTS)
        # Every token copies its slot's weights, and the batched matmuls read the copies.
        gathered = 2 * batch.num_active * slot_elements + (2 + 3 * members) * OP_COST_ELEMENTS
        if stacked <= min(per_slot, gathered):
            _add_fused_stacked(y, x, lora_a, member_b, batch, first, span)
            return
        if gathered < per_slot:
            _add_fused_gathered(y, x, lora_a, member_b, batch)
            return
    _add_fused_grouped(y, x, lora_a, member_b, member_ranks, batch)


def _add_fused_stacked(
    y: Tensor,
    x: Tensor,
    lora_a: Tensor,
    member_b: MemberB,
    batch: LoraBatch,
    first: int,
    span: int,
) -> None:
    rank_class = lora_a.shape[1] // len(member_b)
    num_tokens = x.shape[0]
    # [n, span * members * rank_class]: every token against every slot of the run.
    shrunk = F.linear(x, lora_a[first : first + span].view(-1, lora_a.shape[2]))
    per_member = shrunk.view(num_tokens, span, len(member_b), rank_class)
    mask = batch.span_mask(shrunk.dtype)  # [n, span, 1]: keeps each token's own slot
    for member, (columns, b) in enumerate(member_b):
        # The product is a fresh contiguous [n, span, rank_class]: no copy before the expand.
        picked = (per_member[:, :, member] * mask).view(num_tokens, span * rank_class)
        y[:, columns].addmm_(picked, b[first : first + span].view(span * rank_class, -1))


def _add_fused_gathered(
    y: Tensor, x: Tensor, lora_a: Tensor, member_b: MemberB, batch: LoraBatch
) -> None:
    rank_class = lora_a.shape[1] // len(member_b)
    rows, slots = batch.active_tokens()
    # Rows beyond a member's rank are zero in A and B: the full rank class is exact.
    shrunk = torch.bmm(lora_a.index_select(0, slots), x[rows].unsqueeze(2))  # [k, m * rc, 1]
    for member, (columns, b) in enumerate(member_b):
        part = shrunk[:, member * rank_class : (member + 1) * rank_class].transpose(1, 2)
        delta = torch.bmm(part, b.index_select(0, slots)).squeeze(1)  # [k, width]
        if isinstance(rows, slice):
            y[rows, columns] += delta
        else:
            y[:, columns].index_add_(0, rows, delta)


def _add_fused_grouped(
    y: Tensor,
    x: Tensor,
    lora_a: Tensor,
    member_b: MemberB,
    member_ranks: Sequence[Sequence[int]],
    batch: LoraBatch,
) -> None:
    rank_class = lora_a.shape[1] // len(member_b)
    for slot, rows in batch.slot_rows():
        ranks = member_ranks[slot]
        if not any(ranks):
            continue
        shrunk = F.linear(x[rows], lora_a[slot])  # [k, members * rank_class]
        for member, ((columns, b), rank) in enumerate(zip(member_b, ranks, strict=True)):
            if rank == 0:
                continue
            part = shrunk[:, member * rank_class : member * rank_class + rank]
            if isinstance(rows, slice):
                y[rows, columns].addmm_(part, b[slot, :rank])
            else:
                y[:, columns].index_add_(0, rows, part @ b[slot, :rank])
