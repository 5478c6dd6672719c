"""Multi-LoRA linear layers and the device slot pools they read.

A `LoraPool` holds the adapters of one rank class in stacked tensors. A rank-8 adapter takes a
slot of the rank-8 pool, so small adapters do not pay for the padding of large ones. A forward
pass carries one `ActiveLora` per pool that has tokens in the batch. Two layouts:

- per projection (`LoraParams`, the GPU default): `a [num_slots, rank, in]`,
  `b [num_slots, out, rank]`, applied by `kernels.dispatch.add_lora_trusted` (Triton or torch).
- fused (`FusedLoraParams`, the CPU default): one params set per fused layer (q|k|v, o,
  gate|up, down) with the members' A stacked, `a [num_slots, members * rank, in]`, and each
  member's B transposed on its own, `[num_slots, rank, width]`: one shrink per fused layer and
  one expand per member, reading no padding between the members' columns. Applied by
  `kernels.torch_path.add_fused_lora`.

The pool validates ranks when a slot is written, so the calls skip per-call input checks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NewType

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from inference.adapters import AdapterWeights
from inference.config import ModelConfig
from kernels.dispatch import LoraBatch, add_lora_trusted
from kernels.torch_path import add_fused_lora

# A position in a pool's stacked tensors; never an adapter id.
SlotIndex = NewType("SlotIndex", int)


# How the model fuses projections: (group, member projections in output-column order).
PROJECTION_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("qkv_proj", ("q_proj", "k_proj", "v_proj")),
    ("o_proj", ("o_proj",)),
    ("gate_up_proj", ("gate_proj", "up_proj")),
    ("down_proj", ("down_proj",)),
)


@dataclass
class LoraParams:
    """The slots of one pool for one adapted projection of one decoder layer (the layout of
    unfused pools), over that projection's columns of its fused layer's output.

    The adapter's scale is folded into B when the slot is written and the slot scale is 1,
    which spares every call a per-token scale (the kernels still honour other scales).
    """

    columns: slice  # columns of the fused layer's output these params update
    members: tuple[tuple[str, int, int], ...]  # (projection, first column, width) within columns
    a: Tensor  # [num_slots, max_rank, in_features], zero beyond each slot's rank
    b: Tensor  # [num_slots, out_features, max_rank], zero beyond each slot's rank
    ranks: Tensor  # [num_slots] int32, 0 where the slot's adapter leaves these columns alone
    scales: Tensor  # [num_slots] float32
    users: int = 0  # occupied slots with rank > 0; 0 lets the layer skip the kernel call
    # Host copies of ranks and scales, kept in step by the pool: the CPU path reads them per
    # call, and reading the tensors back would cost two device reads per layer.
    host_ranks: list[int] = field(default_factory=list)  # [num_slots]
    host_scales: list[float] = field(default_factory=list)  # [num_slots]
    # [num_slots] (a[s, :r], b[s, :, :r].T) views of occupied slots, None for empty ones
    slot_views: list[tuple[Tensor, Tensor] | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.host_ranks:
            self.host_ranks = self.ranks.tolist()
            self.host_scales = self.scales.tolist()
            self.slot_views = [None] * len(self.host_ranks)


@dataclass
class FusedLoraParams:
    """The slots of one pool for one fused layer of one decoder layer (CPU layout).

    Member m's A takes rows [m * rank_class, m * rank_class + r_m) of `a` and its B, transposed
    and scaled, `b[m][:, :r_m]`; rows beyond a member's rank stay zero, and a member the adapter
    leaves alone has rank 0.
    """

    rank_class: int
    members: tuple[tuple[str, int, int], ...]  # (projection, first column, width) in the layer
    a: Tensor  # [num_slots, len(members) * rank_class, in_features]
    b: tuple[Tensor, ...]  # per member [num_slots, rank_class, width], B.T * scale
    member_ranks: list[tuple[int, ...]]  # [num_slots] host ranks per member, all 0 when empty
    users: int = 0  # occupied slots with a rank > 0; 0 lets the layer skip the call
    # (columns of the layer's output, b[m]) per member, for the kernel
    member_b: tuple[tuple[slice, Tensor], ...] = ()

    def __post_init__(self) -> None:
        self.member_b = tuple(
            (slice(first, first + width), b)
            for (_, first, width), b in zip(self.members, self.b, strict=True)
        )


def pool_layout(
    model_config: ModelConfig, target_modules: Sequence[str], fuse: bool
) -> list[tuple[str, slice, tuple[tuple[str, int, int], ...], int]]:
    """Per decoder layer: (group, columns, members, rank multiple) for every params set."""
    layout = []
    for group, members in PROJECTION_GROUPS:
        offset = 0
        placed = []
        for target in members:
            width = model_config.projection_shape(target)[1]
            if target in target_modules:
                placed.append((target, offset, width))
            offset += width
        if not placed:
            continue
        if fuse:
            layout.append((group, slice(0, offset), tuple(placed), len(placed)))
        else:
            for target, first, width in placed:
                layout.append((group, slice(first, first + width), ((target, 0, width),), 1))
    return layout


class LoraPool:
    """Device slots for adapters of one rank class."""

    def __init__(
        self,
        model_config: ModelConfig,
        rank_class: int,
        num_slots: int,
        target_modules: Sequence[str],
        dtype: torch.dtype,
        device: torch.device | str,
        fuse: bool = False,
    ) -> None:
        if num_slots < 1:
            raise ValueError(f"a pool needs at least one slot, got {num_slots}")
        self.rank_class = rank_class
        self.num_slots = num_slots
        self.device = torch.device(device)
        # params[layer][group] -> the params sets the fused layer `group` applies.
        self.params: list[dict[str, list[LoraParams | FusedLoraParams]]] = []
        for _ in range(model_config.num_layers):
            layer: dict[str, list[LoraParams | FusedLoraParams]] = {}
            for group, columns, members, multiple in pool_layout(
                model_config, target_modules, fuse
            ):
                in_features = model_config.projection_shape(members[0][0])[0]
                max_rank = rank_class * multiple
                width = columns.stop - columns.start
                if fuse:
                    layer.setdefault(group, []).append(
                        FusedLoraParams(
                            rank_class=rank_class,
                            members=members,
                            a=torch.zeros(
                                num_slots, max_rank, in_features, dtype=dtype, device=device
                            ),
                            b=tuple(
                                torch.zeros(
                                    num_slots, rank_class, w, dtype=dtype, device=device
                                )
                                for _, _, w in members
                            ),
                            member_ranks=[(0,) * len(members)] * num_slots,
                        )
                    )
                    continue
                layer.setdefault(group, []).append(
                    LoraParams(
                        columns=columns,
                        members=members,
                        a=torch.zeros(num_slots, max_rank, in_features, dtype=dtype, device=device),
                        b=torch.zeros(num_slots, width, max_rank, dtype=dtype, device=device),
                        ranks=torch.zeros(num_slots, dtype=torch.int32, device=device),
                        scales=torch.zeros(num_slots, dtype=torch.float32, device=device),
                    )
                )
            self.params.append(layer)
        self._occupied: dict[SlotIndex, list[LoraParams | FusedLoraParams]] = {}

    @staticmethod
    def bytes_per_slot(
        model_config: ModelConfig,
        rank_class: int,
        target_modules: Sequence[str],
        dtype: torch.dtype,
        fuse: bool = False,
    ) -> int:
        element = torch.empty((), dtype=dtype).element_size()
        per_layer = 0
        for _, columns, members, multiple in pool_layout(model_config, target_modules, fuse):
            in_features = model_config.projection_shape(members[0][0])[0]
            # Fused B has no padding between members: each member's B spans its own columns.
            widths = sum(width for _, _, width in members) if fuse else (
                multiple * (columns.stop - columns.start)
            )
            per_layer += rank_class * (multiple * in_features + widths)
        return per_layer * model_config.num_layers * element

    def write(self, slot: SlotIndex, weights: AdapterWeights) -> None:
        """Copy an adapter into `slot` (replacing whatever was there)."""
        # The model's LoRA calls skip add_lora's per-call checks, so this is where ranks are
        # validated, once per write: every member rank <= rank_class keeps each packed slot
        # rank <= its params' max_rank, and the copies below refuse wrongly shaped weights.
        if weights.rank > self.rank_class:
            raise ValueError(
                f"adapter {weights.adapter_id!r} has rank {weights.rank}, too large for the "
                f"rank-{self.rank_class} pool"
            )
        self.clear(slot)
        used: list[LoraParams | FusedLoraParams] = []
        for layer, groups in enumerate(self.params):
            for params_list in groups.values():
                for params in params_list:
                    written = (
                        self._write_fused(params, slot, layer, weights)
                        if isinstance(params, FusedLoraParams)
                        else self._write_params(params, slot, layer, weights)
                    )
                    if written:
                        used.append(params)
        self._occupied[slot] = used

    def _write_fused(
        self, params: FusedLoraParams, slot: SlotIndex, layer: int, weights: AdapterWeights
    ) -> bool:
        ranks = []
        for member, (target, _, _) in enumerate(params.members):
            module = weights.modules.get((layer, target))
            if module is None:
                ranks.append(0)
                continue
            first = member * self.rank_class
            params.a[slot, first : first + module.rank].copy_(module.a, non_blocking=True)
            params.b[member][slot, : module.rank].copy_(
                (module.b * module.scale).t(), non_blocking=True
            )
            ranks.append(module.rank)
        if not any(ranks):
            return False
        params.member_ranks[slot] = tuple(ranks)
        params.users += 1
        return True

    def _write_params(
        self, params: LoraParams, slot: SlotIndex, layer: int, weights: AdapterWeights
    ) -> bool:
        packed = 0
        for target, first, width in params.members:
            module = weights.modules.get((layer, target))
            if module is None:
                continue
            rank = module.rank
            b = module.b * module.scale
            params.a[slot, packed : packed + rank].copy_(module.a, non_blocking=True)
            params.b[slot, first : first + width, packed : packed + rank].copy_(
                b, non_blocking=True
            )
            params.scales[slot] = 1.0
            params.host_scales[slot] = 1.0
            packed += rank
        if packed == 0:
            return False
        params.ranks[slot] = packed
        params.host_ranks[slot] = packed
        params.slot_views[slot] = (params.a[slot, :packed], params.b[slot, :, :packed].t())
        params.users += 1
        return True

    def clear(self, slot: SlotIndex) -> None:
        """Empty a slot; clearing an empty slot does nothing."""
        for params in self._occupied.pop(slot, []):
            if isinstance(params, FusedLoraParams):
                params.a[slot].zero_()
                for b in params.b:
                    b[slot].zero_()
                params.member_ranks[slot] = (0,) * len(params.members)
                params.users -= 1
                continue
            params.a[slot].zero_()
            params.b[slot].zero_()
            params.ranks[slot] = 0
            params.scales[slot] = 0.0
            params.host_ranks[slot] = 0
            params.host_scales[slot] = 0.0
            params.slot_views[slot] = None
            params.users -= 1


@dataclass
class ActiveLora:
    """One pool's share of a forward pass."""

    pool: LoraPool
    batch: LoraBatch  # token_slots [num_tokens]: slot in this pool, -1 for other tokens


def build_active_lora(
    pools: Sequence[LoraPool],
    token_pools: Sequence[int],
    token_slots: Sequence[int],
    *,
    prefill: bool,
) -> list[ActiveLora]:
    """Per-pool batch metadata for a forward pass.

    token_pools[i] is the index in `pools` of token i's adapter (-1 = base model only) and
    token_slots[i] its slot there. Pools without tokens are left out, so a batch of base-model
    requests costs no LoRA work at all.
    """
    active: list[ActiveLora] = []
    for index, pool in enumerate(pools):
        slots = [s if p == index else -1 for p, s in zip(token_pools, token_slots, strict=True)]
        if all(s < 0 for s in slots):
            continue
        tensor = torch.tensor(slots, dtype=torch.int64, device=pool.device)
        batch = LoraBatch.from_token_slots(
            tensor, prefill=prefill, num_slots=pool.num_slots, host_slots=slots
        )
        active.append(ActiveLora(pool, batch))
    return active


def column_major(rows: int, columns: int) -> Tensor:
    """An uninitialised [rows, columns] weight laid out column by column (the transposed view
    of a contiguous [columns, rows] buffer). `F.linear(x, weight)` then multiplies by a
    contiguous matrix without transposing it, which on the CPU (MKL) takes 1.4-2x less time
    for the 4-64 rows of a decode batch than a row-major weight, and the same for 1-2 rows;
    the weight reads as the same [out, in] tensor everywhere else."""
    return torch.empty(columns, rows).t()


class MultiLoraLinear(nn.Module):
    """A fused linear layer (q|k|v, gate|up, or a single projection) whose outputs get the
    LoRA delta of every token's own adapter."""

    def __init__(
        self,
        group: str,
        in_features: int,
        parts: Sequence[tuple[str, int]],
        layer_index: int,
        bias: bool = False,
        weight_column_major: bool = True,
    ) -> None:
        super().__init__()
        out_features = sum(size for _, size in parts)
        weight = (
            column_major(out_features, in_features)
            if weight_column_major
            else torch.empty(out_features, in_features)
        )
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        self.group = group
        self.layer_index = layer_index
        self.parts: list[tuple[str, slice]] = []
        start = 0
        for name, size in parts:
            self.parts.append((name, slice(start, start + size)))
            start += size

    def forward(self, x: Tensor, lora: Sequence[ActiveLora]) -> Tensor:
        y = F.linear(x, self.weight, self.bias)
        for active in lora:
            for params in active.pool.params[self.layer_index].get(self.group, ()):
                if params.users == 0:
                    continue
                if isinstance(params, FusedLoraParams):
                    add_fused_lora(
                        y, x, params.a, params.member_b, params.member_ranks, active.batch
                    )
                    continue
                # Shapes are fixed by the pool, ranks checked on write, slots when the batch
                # was built: nothing is left for per-call checks to find.
                add_lora_trusted(
                    y[:, params.columns],
                    x,
                    params.a,
                    params.b,
                    params.ranks,
                    params.scales,
                    active.batch,
                    host_ranks=params.host_ranks,
                    host_scales=params.host_scales,
                    slot_views=params.slot_views,
                )
        return y
