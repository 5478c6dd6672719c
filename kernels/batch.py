"""Batch metadata for multi-LoRA layers: which adapter slot each token uses.

Built once per forward pass (one host synchronisation) and shared by every LoRA layer, so the
per-layer calls never need to read device values back to the host.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

# Rows of one slot: a slice when they are consecutive (prefill runs), else an index tensor.
SlotRows = slice | Tensor


@dataclass(frozen=True)
class GatherBucket:
    """Active tokens whose slots share one rank, for the gathered (batched matmul) path."""

    rank: int  # rank of every slot in the bucket (> 0)
    rows: SlotRows  # [k] the bucket's tokens, a slice when consecutive
    slots: Tensor  # [k] int64, slot of each of those tokens


@dataclass(frozen=True)
class Segments:
    """Runs of consecutive tokens that share one adapter slot (prefill / SGMV path)."""

    seg_starts: Tensor  # [S] int32, index of the first token of each run
    seg_lens: Tensor  # [S] int32, number of tokens in each run (>= 1)
    seg_slots: Tensor  # [S] int32, slot of each run (>= 0; runs of -1 tokens are left out)
    max_seg_len: int  # host copy of max(seg_lens) (0 when S == 0), sizes the kernel grid

    @property
    def num_segments(self) -> int:
        return self.seg_starts.numel()


@dataclass
class LoraBatch:
    """Which slot of an adapter pool each token of the batch uses.

    Slots are positions in one stacked pool tensor, not adapter ids; -1 means the token has no
    adapter in this pool and gets no work.
    """

    token_slots: Tensor  # [num_tokens] int64, slot per token, -1 = no adapter in this pool
    segments: Segments | None  # prefill: runs of equal slots; None -> decode / BGMV path
    num_active: int  # host count of tokens with slot >= 0; 0 makes add_lora a no-op
    max_slot: int  # host max(token_slots) (-1 when no token is active), checked against the pool
    _slot_rows: list[tuple[int, SlotRows]] | None = field(
        default=None, init=False, repr=False, compare=False
    )
    _host_slots: list[int] | None = field(default=None, repr=False, compare=False)
    # Keyed by the ranks of the active slots: the layers of one pass share a few rank patterns.
    _buckets: dict[tuple[int, ...], list[GatherBucket]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    _span_masks: dict[torch.dtype, Tensor] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    _active_tokens: tuple[SlotRows, Tensor] | None = field(
        default=None, init=False, repr=False, compare=False
    )

    @property
    def num_tokens(self) -> int:
        return self.token_slots.numel()

    @property
    def host_slots(self) -> list[int]:
        """token_slots as a host list (read from the device once, then cached)."""
        if self._host_slots is None:
            self._host_slots = self.token_slots.tolist()
        return self._host_slots

    @property
    def active_slots(self) -> list[int]:
        """Distinct slots with tokens, ascending."""
        return [slot for slot, _ in self.slot_rows()]

    @property
    def num_active_slots(self) -> int:
        return len(self.slot_rows())

    @property
    def slot_span(self) -> tuple[int, int]:
        """(first active slot, last active slot - first + 1); (0, 0) when none is active."""
        slots = self.active_slots
        return (slots[0], slots[-1] - slots[0] + 1) if slots else (0, 0)

    def span_mask(self, dtype: torch.dtype) -> Tensor:
        """[num_tokens, span, 1] of `dtype`: 1 where token i uses slot `first + j` of
        `slot_span`, else 0; built once per dtype and cached."""
        mask = self._span_masks.get(dtype)
        if mask is None:
            first, span = self.slot_span
            rows = [[0.0] * span for _ in self.host_slots]
            for row, slot in zip(rows, self.host_slots, strict=True):
                if slot >= 0:
                    row[slot - first] = 1.0
            mask = torch.tensor(rows, dtype=dtype, device=self.token_slots.device)
            mask = self._span_masks[dtype] = mask.unsqueeze(2)
        return mask

    @classmethod
    def from_token_slots(
        cls,
        token_slots: Tensor,
        prefill: bool,
        num_slots: int | None = None,
        host_slots: list[int] | None = None,
    ) -> LoraBatch:
        """Build the metadata for `token_slots` ([num_tokens] integer, -1 = no adapter).

        prefill=True also builds the SGMV segments (runs of equal consecutive slots). When
        `num_slots` is given, slots must lie in [-1, num_slots). `host_slots`, the same slots
        as a host list when the caller has one, spares reading them back from the device.
        """
        if token_slots.dim() != 1:
            raise ValueError(
                f"token_slots must be 1-D [num_tokens], got shape {tuple(token_slots.shape)}"
            )
        if token_slots.dtype.is_floating_point or token_slots.dtype == torch.bool:
            raise TypeError(f"token_slots must be an integer tensor, got {token_slots.dtype}")
        token_slots = token_slots.to(torch.int64).contiguous()
        if host_slots is not None and len(host_slots) != token_slots.numel():
            raise ValueError(
                f"host_slots has {len(host_slots)} entries, token_slots {token_slots.numel()}"
            )
        if token_slots.numel() == 0:
            min_slot, max_slot, num_active = -1, -1, 0
        elif host_slots is not None:
            min_slot, max_slot = min(host_slots), max(host_slots)
            num_active = sum(1 for s in host_slots if s >= 0)
        else:
            # One transfer for the three host values every layer needs.
            stats = torch.stack(
                [token_slots.min(), token_slots.max(), (token_slots >= 0).sum()]
            ).tolist()
            min_slot, max_slot, num_active = (int(v) for v in stats)
        if min_slot < -1:
            raise ValueError(f"token_slots must be >= -1 (-1 = no adapter), got {min_slot}")
        if num_slots is not None and max_slot >= num_slots:
            raise ValueError(f"token slot {max_slot} is out of range for a pool of {num_slots}")
        segments = _build_segments(token_slots) if prefill else None
        return cls(token_slots, segments, num_active, max_slot, _host_slots=host_slots)

    def slot_rows(self) -> list[tuple[int, SlotRows]]:
        """Active slots with the rows that use them, computed once and cached (torch path)."""
        if self._slot_rows is None:
            self._slot_rows = _group_rows(self)
        return self._slot_rows

    def active_tokens(self) -> tuple[SlotRows, Tensor]:
        """(rows, slots) of every token with a slot, in token order; computed once and cached
        (the fused gathered path, where padding beyond a slot's ranks is zero and needs no
        bucketing by rank)."""
        if self._active_tokens is None:
            rows = [i for i, slot in enumerate(self.host_slots) if slot >= 0]
            slots = [self.host_slots[i] for i in rows]
            device = self.token_slots.device
            self._active_tokens = (
                _rows(rows, device), torch.tensor(slots, dtype=torch.int64, device=device)
            )
        return self._active_tokens

    def gather_buckets(self, rank_of: Sequence[int]) -> list[GatherBucket]:
        """Active tokens bucketed by their slot's rank (`rank_of[slot]`), rank-0 slots left
        out; cached per rank pattern (gathered torch path)."""
        key = tuple(rank_of[slot] for slot in self.active_slots)
        buckets = self._buckets.get(key)
        if buckets is None:
            buckets = self._buckets[key] = _bucket_by_rank(self, rank_of)
        return buckets


def _build_segments(token_slots: Tensor) -> Segments:
    device = token_slots.device
    if token_slots.numel() == 0:
        empty = torch.zeros(0, dtype=torch.int32, device=device)
        return Segments(empty, empty.clone(), empty.clone(), 0)
    run_slots, run_lens = torch.unique_consecutive(token_slots, return_counts=True)
    run_starts = torch.cumsum(run_lens, 0) - run_lens
    keep = run_slots >= 0
    seg_lens = run_lens[keep].to(torch.int32)
    max_seg_len = int(seg_lens.max()) if seg_lens.numel() else 0
    return Segments(
        seg_starts=run_starts[keep].to(torch.int32).contiguous(),
        seg_lens=seg_lens.contiguous(),
        seg_slots=run_slots[keep].to(torch.int32).contiguous(),
        max_seg_len=max_seg_len,
    )


def _rows(indices: list[int], device: torch.device) -> SlotRows:
    first, last = indices[0], indices[-1]
    if last - first + 1 == len(indices):
        return slice(first, last + 1)
    return torch.tensor(indices, dtype=torch.int64, device=device)


def _group_rows(batch: LoraBatch) -> list[tuple[int, SlotRows]]:
    # Grouped by slot even for prefill: runs of one adapter in several requests share a matmul.
    # Built on the host: a handful of list operations beats a sort and a split on the device.
    if batch.num_active == 0:
        return []
    by_slot: dict[int, list[int]] = {}
    for index, slot in enumerate(batch.host_slots):
        if slot >= 0:
            by_slot.setdefault(slot, []).append(index)
    device = batch.token_slots.device
    return [(slot, _rows(by_slot[slot], device)) for slot in sorted(by_slot)]


def _bucket_by_rank(batch: LoraBatch, rank_of: Sequence[int]) -> list[GatherBucket]:
    by_rank: dict[int, tuple[list[int], list[int]]] = {}
    for index, slot in enumerate(batch.host_slots):
        if slot >= 0 and rank_of[slot] > 0:
            rows, slots = by_rank.setdefault(rank_of[slot], ([], []))
            rows.append(index)
            slots.append(slot)
    device = batch.token_slots.device
    return [
        GatherBucket(
            rank=rank,
            rows=_rows(rows, device),
            slots=torch.tensor(slots, dtype=torch.int64, device=device),
        )
        for rank, (rows, slots) in sorted(by_rank.items())
    ]
