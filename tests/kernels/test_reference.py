"""The oracle itself, checked against a formulation written independently: peft's merged
weight W_delta = scale * B @ A applied as one dense matmul per token."""

import torch

from kernels.reference import reference_add_lora, reference_expand, reference_shrink


def test_reference_equals_merged_weight_delta() -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 6, generator=gen)
    y = torch.randn(4, 5, generator=gen)
    lora_a = torch.randn(2, 3, 6, generator=gen)
    lora_b = torch.randn(2, 5, 3, generator=gen)
    ranks = torch.tensor([3, 2], dtype=torch.int32)
    scales = torch.tensor([0.5, 2.0])
    token_slots = torch.tensor([1, -1, 0, 1])
    lora_a[1, 2:] = float("nan")
    lora_b[1, :, 2:] = float("nan")

    got = reference_add_lora(y, x, lora_a, lora_b, ranks, scales, token_slots)

    merged = [
        scales[s].double() * lora_b[s, :, :r].double() @ lora_a[s, :r].double()
        for s, r in enumerate(ranks.tolist())
    ]
    for i, s in enumerate(token_slots.tolist()):
        want = y[i].double() if s < 0 else y[i].double() + merged[s] @ x[i].double()
        torch.testing.assert_close(got[i], want)
    assert got.dtype == torch.float64


def test_shrink_is_zero_past_rank_and_on_base_rows() -> None:
    x = torch.ones(2, 4)
    lora_a = torch.ones(1, 3, 4)
    lora_a[0, 1:] = float("nan")
    t = reference_shrink(x, lora_a, torch.tensor([1]), torch.tensor([0.5]), torch.tensor([0, -1]))
    assert t.tolist() == [[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    y = reference_expand(
        torch.zeros(2, 2), t, torch.ones(1, 2, 3), torch.tensor([1]), torch.tensor([0, -1])
    )
    assert y.tolist() == [[2.0, 2.0], [0.0, 0.0]]
