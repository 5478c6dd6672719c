import pytest
import torch

from kernels.batch import LoraBatch


def slots(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64)


def test_segments_are_runs_of_equal_slots_without_base_runs() -> None:
    batch = LoraBatch.from_token_slots(slots(3, 3, -1, -1, 0, 3, 3, 3), prefill=True)
    seg = batch.segments
    assert seg is not None
    assert seg.seg_starts.tolist() == [0, 4, 5]
    assert seg.seg_lens.tolist() == [2, 1, 3]
    assert seg.seg_slots.tolist() == [3, 0, 3]
    assert seg.max_seg_len == 3
    assert all(t.dtype == torch.int32 for t in (seg.seg_starts, seg.seg_lens, seg.seg_slots))
    assert batch.num_active == 6
    assert batch.max_slot == 3


def test_decode_batch_has_no_segments() -> None:
    batch = LoraBatch.from_token_slots(slots(1, 0, 1), prefill=False)
    assert batch.segments is None
    assert batch.token_slots.dtype == torch.int64


def test_all_base_batch_is_inactive() -> None:
    batch = LoraBatch.from_token_slots(slots(-1, -1), prefill=True)
    assert batch.num_active == 0
    assert batch.max_slot == -1
    assert batch.segments is not None and batch.segments.num_segments == 0
    assert batch.slot_rows() == []


def test_empty_batch() -> None:
    batch = LoraBatch.from_token_slots(torch.zeros(0, dtype=torch.int64), prefill=True)
    assert batch.num_tokens == 0
    assert batch.num_active == 0


def test_slot_rows_groups_tokens_by_slot() -> None:
    batch = LoraBatch.from_token_slots(slots(2, -1, 0, 2, 0, 0), prefill=False)
    groups = {slot: rows for slot, rows in batch.slot_rows()}
    assert set(groups) == {0, 2}
    assert torch.equal(torch.as_tensor(groups[2]), torch.tensor([0, 3]))
    assert torch.equal(torch.as_tensor(groups[0]), torch.tensor([2, 4, 5]))


def test_slot_rows_uses_slices_for_consecutive_tokens() -> None:
    batch = LoraBatch.from_token_slots(slots(1, 1, 1, 0), prefill=False)
    assert batch.slot_rows() == [(0, slice(3, 4)), (1, slice(0, 3))]


def test_slot_rows_groups_a_slot_across_prefill_runs() -> None:
    prefill = LoraBatch.from_token_slots(slots(1, 1, -1, 1, 0), prefill=True)
    [(slot_zero, rows_zero), (slot_one, rows_one)] = prefill.slot_rows()
    assert (slot_zero, rows_zero) == (0, slice(4, 5))
    assert slot_one == 1 and rows_one.tolist() == [0, 1, 3]


@pytest.mark.parametrize(
    ("token_slots", "message"),
    [
        (torch.zeros(2, 2, dtype=torch.int64), "1-D"),
        (torch.zeros(3), "integer"),
        (slots(0, -2), ">= -1"),
        (slots(0, 4), "out of range for a pool of 4"),
    ],
)
def test_bad_token_slots_are_rejected(token_slots: torch.Tensor, message: str) -> None:
    with pytest.raises((ValueError, TypeError), match=message):
        LoraBatch.from_token_slots(token_slots, prefill=True, num_slots=4)


def test_gather_buckets_split_tokens_by_rank_and_skip_rank_zero() -> None:
    batch = LoraBatch.from_token_slots(slots(0, 1, 1, 2, -1, 3), prefill=False)
    rank_of = [8, 16, 8, 0]
    buckets = batch.gather_buckets(rank_of)
    assert [b.rank for b in buckets] == [8, 16]
    eight, sixteen = buckets
    assert eight.rows.tolist() == [0, 3] and eight.slots.tolist() == [0, 2]
    assert sixteen.rows == slice(1, 3) and sixteen.slots.tolist() == [1, 1]
    assert batch.gather_buckets(rank_of) is buckets  # cached per rank pattern
    assert [b.rank for b in batch.gather_buckets([8, 8, 8, 8])] == [8]


def test_host_slots_give_the_same_metadata_without_a_device_read() -> None:
    values = [2, -1, 0, 2]
    from_host = LoraBatch.from_token_slots(slots(*values), prefill=False, host_slots=values)
    from_device = LoraBatch.from_token_slots(slots(*values), prefill=False)
    assert (from_host.num_active, from_host.max_slot) == (from_device.num_active, 2)
    assert from_host.active_slots == from_device.active_slots == [0, 2]
    with pytest.raises(ValueError, match="host_slots has 1 entries"):
        LoraBatch.from_token_slots(slots(*values), prefill=False, host_slots=[0])
