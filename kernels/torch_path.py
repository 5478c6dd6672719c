"""Fast PyTorch path for the LoRA delta: one matmul pair per distinct slot.

This is what serving on the CPU runs. Tokens are grouped by slot once per forward pass (cached
on the LoraBatch), tokens with slot -1 are never touched, and each group does
`y[rows] += scale * (x[rows] @ A[:r].T) @ B[:, :r].T` in float32, reading only the first r rows
of A and columns of B so the padding of a slot is never part of the result.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels.batch import LoraBatch


def add_lora_torch(
    y: Tensor,
    x: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    ranks: Tensor,
    scales: Tensor,
    batch: LoraBatch,
) -> None:
    """y[i] += scales[s] * (x[i] @ lora_a[s, :r].T) @ lora_b[s, :, :r].T for tokens with s >= 0.

    Shapes as in `kernels.dispatch.add_lora`; inputs are assumed checked by the caller.
    """
    if batch.num_active == 0:
        return
    rank_of = ranks.tolist()
    scale_of = scales.tolist()
    exact_dtype = y.dtype == torch.float32
    for slot, rows in batch.slot_rows():
        rank = rank_of[slot]
        if rank == 0:
            continue
        a = lora_a[slot, :rank]  # [r, in_features]
        b = lora_b[slot, :, :rank]  # [out_features, r]
        if exact_dtype:
            shrunk = F.linear(x[rows], a)  # [n, r]
            if isinstance(rows, slice):
                # GEMM accumulates into y's rows directly, the scale folded into alpha.
                y[rows].addmm_(shrunk, b.t(), alpha=scale_of[slot])
            else:
                y.index_add_(0, rows, F.linear(shrunk, b), alpha=scale_of[slot])
            continue
        # Half precision: compute in float32 and round into y once, as the kernels do.
        shrunk = F.linear(x[rows].float(), a.float())
        delta = torch.addmm(
            y[rows].float(), shrunk, b.float().t(), alpha=scale_of[slot]
        )  # [n, out_features]
        if isinstance(rows, slice):
            y[rows] = delta.to(y.dtype)
        else:
            y.index_copy_(0, rows, delta.to(y.dtype))
