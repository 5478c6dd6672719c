"""PyTorch reference for the LoRA kernels: the oracle the tests compare against.

Written for obviousness, not speed: one token at a time, in float64. Nothing here modifies its
inputs; every function returns a new float64 tensor.
"""

from __future__ import annotations

import torch
from torch import Tensor


def reference_shrink(
    x: Tensor, lora_a: Tensor, ranks: Tensor, scales: Tensor, token_slots: Tensor
) -> Tensor:
    """t[i, :r] = scales[s] * x[i] @ lora_a[s, :r, :].T, s = token_slots[i], r = ranks[s].

    Returns t: [num_tokens, max_rank] float64, zero beyond each token's rank and on rows with
    slot -1.
    """
    t = torch.zeros(x.shape[0], lora_a.shape[1], dtype=torch.float64)
    x64 = x.cpu().double()
    a_of: dict[int, Tensor] = {}  # float64 copies, made once per slot
    for i, s in enumerate(token_slots.tolist()):
        if s < 0:
            continue
        r = int(ranks[s])
        if s not in a_of:
            a_of[s] = lora_a[s, :r].cpu().double()
        t[i, :r] = float(scales[s]) * (a_of[s] @ x64[i])
    return t


def reference_expand(
    y: Tensor, t: Tensor, lora_b: Tensor, ranks: Tensor, token_slots: Tensor
) -> Tensor:
    """Returns y + delta in float64, delta[i] = t[i, :r] @ lora_b[s, :, :r].T for slot s >= 0."""
    out = y.cpu().double().clone()
    t64 = t.cpu().double()
    b_of: dict[int, Tensor] = {}  # float64 copies, made once per slot
    for i, s in enumerate(token_slots.tolist()):
        if s < 0:
            continue
        r = int(ranks[s])
        if s not in b_of:
            b_of[s] = lora_b[s, :, :r].cpu().double()
        out[i] += b_of[s] @ t64[i, :r]
    return out


def reference_add_lora(
    y: Tensor,
    x: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    ranks: Tensor,
    scales: Tensor,
    token_slots: Tensor,
) -> Tensor:
    """Returns y + scales[s] * (x[i] @ A[s, :r].T) @ B[s, :, :r].T per token, in float64.

    Rows whose slot is -1 come back equal to y. Padding of a slot beyond its rank is never read.
    """
    t = reference_shrink(x, lora_a, ranks, scales, token_slots)
    return reference_expand(y, t, lora_b, ranks, token_slots)
