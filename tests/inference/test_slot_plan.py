"""Slot plans follow from the model's size: every rank class gets slots by default, and a
budget too small for a class is refused with the bytes it needs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from inference.config import LORA_TARGETS, LoraServingConfig, ModelConfig
from inference.lora_layers import LoraPool
from inference.slot_plan import (
    DEFAULT_BUDGET_FLOOR,
    MIN_DEFAULT_SLOTS,
    SlotBudgetTooSmall,
    plan_slots,
)
from loraledger.cli import app

# SmolLM2-135M's config.json: 30 layers, grouped-query attention 9/3, tied embeddings.
SMOLLM2_HF = {
    "model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
    "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
    "head_dim": 64, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
    "rope_theta": 100000.0, "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2,
}  # fmt: skip
SMOLLM2 = ModelConfig.from_hf_config(SMOLLM2_HF)
TINY = ModelConfig.from_preset("tiny")
MODELS = [SMOLLM2, TINY, ModelConfig.from_preset("llama-3.2-1b")]


@pytest.mark.parametrize("model", MODELS, ids=["smollm2", "tiny", "llama-3.2-1b"])
@pytest.mark.parametrize("fuse", [True, False])
def test_the_default_plan_gives_every_rank_class_slots(model: ModelConfig, fuse: bool) -> None:
    serving = LoraServingConfig()
    plan = plan_slots(model, serving, torch.float32, fuse)
    assert [c.rank for c in plan.classes] == list(serving.rank_classes)
    assert all(c.slots >= MIN_DEFAULT_SLOTS for c in plan.classes)
    assert plan.budget_source == "derived from the model"
    assert plan.total_bytes <= plan.budget_bytes
    for rank_class in plan.classes:
        assert rank_class.bytes_per_slot == LoraPool.bytes_per_slot(
            model, rank_class.rank, LORA_TARGETS, torch.float32, fuse=fuse
        )
        # Equal shares of the budget: no class could take one more slot.
        assert (rank_class.slots + 1) * rank_class.bytes_per_slot > plan.budget_bytes // 4


def test_a_small_model_keeps_the_budget_floor() -> None:
    plan = plan_slots(TINY, LoraServingConfig(), torch.float32, fuse=False)
    assert plan.budget_bytes == DEFAULT_BUDGET_FLOOR
    assert [c.slots for c in plan.classes] == [
        DEFAULT_BUDGET_FLOOR // 4 // c.bytes_per_slot for c in plan.classes
    ]


def test_the_64_mib_budget_that_dropped_rank_16_on_smollm2_is_refused() -> None:
    serving = LoraServingConfig(device_budget_bytes=64 << 20)
    with pytest.raises(SlotBudgetTooSmall) as refused:
        plan_slots(SMOLLM2, serving, torch.float32, fuse=False)
    message = str(refused.value)
    assert "\n" not in message and "leaves rank class 16 without a slot" in message
    needed = int(message.split("at least ")[1].split(" bytes")[0])
    fits = plan_slots(SMOLLM2, LoraServingConfig(device_budget_bytes=needed), torch.float32, False)
    assert [c.slots for c in fits.classes] == [8, 4, 2, 1]
    with pytest.raises(SlotBudgetTooSmall, match="rank class 64"):
        plan_slots(SMOLLM2, LoraServingConfig(device_budget_bytes=needed - 1), torch.float32, False)


def test_explicit_slot_counts_are_the_plan() -> None:
    plan = plan_slots(TINY, LoraServingConfig(slots_per_class=(3, 0, 1, 1)), torch.float32, True)
    assert [c.slots for c in plan.classes] == [3, 0, 1, 1] and plan.max_rank == 64
    assert plan.budget_bytes == plan.total_bytes and plan.budget_source == "slot counts"
    with pytest.raises(SlotBudgetTooSmall, match="no rank class a slot"):
        plan_slots(TINY, LoraServingConfig(slots_per_class=(0, 0, 0, 0)), torch.float32, True)


def test_adapters_plan_shows_the_slots_of_the_base_model(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(SMOLLM2_HF))
    env = {"LORALEDGER_HOME": str(tmp_path), "LORALEDGER_BASE_MODEL": str(tmp_path)}
    shown = CliRunner().invoke(app, ["adapters", "plan", "--device", "cuda"], env=env)
    assert shown.exit_code == 0, shown.output
    plan = plan_slots(SMOLLM2, LoraServingConfig(), torch.float32, fuse=False)
    for rank_class in plan.classes:
        assert f"│ {rank_class.rank:<10} │ {rank_class.slots:<5} │" in shown.output
        assert f"{rank_class.bytes_per_slot:,}" in shown.output
    assert f"{plan.total_bytes:,} bytes" in shown.output
    assert "derived from the model" in shown.output
    refused = CliRunner().invoke(app, ["adapters", "plan", "--adapter-memory", "1000"], env=env)
    assert refused.exit_code == 1
    assert "leaves rank class 8 without a slot" in refused.output
