"""The fused-pool CPU path (`add_fused_lora`): stacked decode, gathered decode and slot by slot,
against float64."""

import pytest
import torch

import kernels.torch_path as torch_path
from kernels.batch import LoraBatch
from kernels.torch_path import add_fused_lora

WIDTHS = (24, 8, 8)  # a q|k|v-like layer: members of different widths
RANK_CLASS = 4
IN_FEATURES = 16
# member ranks per slot: slot 1 leaves k alone, slot 2 is under-ranked, slot 4 is empty; the
# slots after 5 make room for scattered batches
SLOT_RANKS = [(4, 4, 4), (4, 0, 4), (2, 3, 1), (4, 4, 4), (0, 0, 0), (4, 4, 4)] + [
    (4, 4, 4), (3, 4, 2), (4, 4, 0), (1, 1, 1), (4, 2, 4), (4, 4, 4), (0, 4, 4), (4, 4, 4),
    (2, 2, 2), (4, 3, 4),
]
# Elements of one slot (A and every member's B): the exchange rate of one op in the cases below.
SLOT_ELEMENTS = len(WIDTHS) * RANK_CLASS * IN_FEATURES + RANK_CLASS * sum(WIDTHS)


def fused_layer(dtype: torch.dtype, seed: int):
    generator = torch.Generator().manual_seed(seed)
    slots = len(SLOT_RANKS)
    a = torch.zeros(slots, len(WIDTHS) * RANK_CLASS, IN_FEATURES, dtype=torch.float64)
    b = [torch.zeros(slots, RANK_CLASS, width, dtype=torch.float64) for width in WIDTHS]
    for slot, ranks in enumerate(SLOT_RANKS):
        for member, rank in enumerate(ranks):
            first = member * RANK_CLASS
            a[slot, first : first + rank] = torch.randn(rank, IN_FEATURES, generator=generator)
            b[member][slot, :rank] = torch.randn(rank, WIDTHS[member], generator=generator)
    columns, start = [], 0
    for width in WIDTHS:
        columns.append(slice(start, start + width))
        start += width
    return a, b, columns


def expected(y, x, a, b, columns, token_slots):
    out = y.double().clone()
    for i, slot in enumerate(token_slots):
        if slot < 0:
            continue
        for member, rank in enumerate(SLOT_RANKS[slot]):
            rows = a[slot, member * RANK_CLASS : member * RANK_CLASS + rank]
            out[i, columns[member]] += (x[i].double() @ rows.T) @ b[member][slot, :rank]
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("token_slots", "prefill", "op_cost", "path"),
    [
        # Ops free: the choice weighs weight reads alone.
        ([3, -1, 1, 3, 2, 0], False, 0, "stacked"),  # close slots, repeats, a base token
        ([5, -1, 0], False, 0, "grouped"),  # two slots spanning six: slot by slot
        ([1, 1, 1, -1, 2, 2, 1, 0], True, 0, "grouped"),  # prefill runs, one slot in two runs
        # An op costs a slot's reads: four slots spread over sixteen are cheapest gathered.
        ([15, 0, -1, 8, 2], False, SLOT_ELEMENTS, "gathered"),
    ],
    ids=["stacked", "scattered", "prefill", "gathered"],
)
def test_matches_reference(
    monkeypatch,
    dtype: torch.dtype,
    token_slots: list[int],
    prefill: bool,
    op_cost: int,
    path: str,
) -> None:
    monkeypatch.setattr(torch_path, "OP_COST_ELEMENTS", op_cost)
    calls = {"stacked": 0, "gathered": 0, "grouped": 0}
    for name in calls:
        original = getattr(torch_path, f"_add_fused_{name}")

        def counted(*args, _original=original, _name=name, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(torch_path, f"_add_fused_{name}", counted)
    a, b, columns = fused_layer(dtype, seed=len(token_slots))
    x = torch.randn(len(token_slots), IN_FEATURES).to(dtype)
    y = torch.randn(len(token_slots), sum(WIDTHS)).to(dtype)
    want = expected(y, x, a, b, columns, token_slots)
    batch = LoraBatch.from_token_slots(torch.tensor(token_slots), prefill=prefill)
    member_b = [(cols, bm.to(dtype)) for cols, bm in zip(columns, b, strict=True)]
    add_fused_lora(y, x, a.to(dtype), member_b, SLOT_RANKS, batch)
    assert calls == {name: int(name == path) for name in calls}
    tolerance = 1e-5 if dtype == torch.float32 else 0.1
    torch.testing.assert_close(y.double(), want, atol=tolerance, rtol=tolerance * 0.1)
    base_rows = [i for i, slot in enumerate(token_slots) if slot < 0]
    before = y.clone()
    add_fused_lora(y, x, a.to(dtype), member_b, SLOT_RANKS, batch)
    assert torch.equal(y[base_rows], before[base_rows])  # a base token's output is untouched
