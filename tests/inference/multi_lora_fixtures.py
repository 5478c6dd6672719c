"""Shared builders for the model, adapter, engine and oracle tests: a tiny Llama checkpoint
saved with transformers and LoRA adapters made and saved with peft."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

TINY_HF = {
    "vocab_size": 256,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "max_position_embeddings": 256,
}

ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def save_tiny_llama(directory: Path, seed: int = 0, **overrides: Any) -> Path:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**TINY_HF, **overrides}))
    model.save_pretrained(directory, safe_serialization=True)
    return directory


def save_tiny_qwen2(directory: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(Qwen2Config(**TINY_HF, tie_word_embeddings=True))
    with torch.no_grad():  # Qwen2 initialises q/k/v biases to zero; make them matter
        for name, param in model.named_parameters():
            if name.endswith("_proj.bias"):
                param.normal_(0.0, 0.5)
    model.save_pretrained(directory, safe_serialization=True)
    return directory


@dataclass(frozen=True)
class AdapterRecipe:
    adapter_id: str
    r: int
    lora_alpha: float
    target_modules: list[str] = field(default_factory=lambda: list(ALL_TARGETS))
    use_rslora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    seed: int = 0


def load_hf(model_dir: Path) -> LlamaForCausalLM:
    model = LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    return model.eval()


def save_peft_adapter_with_peft(model_dir: Path, store: Path, recipe: AdapterRecipe) -> Path:
    """Make an adapter with peft's get_peft_model, give lora_B random non-zero values (peft
    starts it at zero, which would hide every bug) and save it with save_pretrained."""
    base = load_hf(model_dir)
    config = LoraConfig(
        r=recipe.r,
        lora_alpha=recipe.lora_alpha,
        target_modules=recipe.target_modules,
        use_rslora=recipe.use_rslora,
        rank_pattern=recipe.rank_pattern,
        alpha_pattern=recipe.alpha_pattern,
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(recipe.seed)
    model = get_peft_model(base, config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                param.normal_(0.0, 0.2)
    target = store / recipe.adapter_id
    model.save_pretrained(target, safe_serialization=True)
    return target


def peft_model(model_dir: Path, adapter_dir: Path | None) -> torch.nn.Module:
    """The reference: transformers' model with peft's adapter applied, or the bare base."""
    base = load_hf(model_dir)
    if adapter_dir is None:
        return base
    return PeftModel.from_pretrained(base, adapter_dir).eval()


@torch.no_grad()
def reference_logits(model: torch.nn.Module, token_ids: list[int]) -> torch.Tensor:
    """[len(token_ids), vocab] float32 logits of a full forward pass."""
    return model(torch.tensor([token_ids])).logits[0].float()


@torch.no_grad()
def reference_greedy(model: torch.nn.Module, prompt: list[int], max_new_tokens: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(max_new_tokens):
        tokens.append(int(reference_logits(model, tokens)[-1].argmax()))
    return tokens[len(prompt) :]
