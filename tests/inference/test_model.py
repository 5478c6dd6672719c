"""The compact model against transformers: Llama, Qwen2 (q/k/v bias, tied embeddings), sharded
checkpoints, Llama 3 rope scaling, chunked prefill, and clear errors for bad checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from multi_lora_fixtures import TINY_HF, load_hf, save_tiny_llama, save_tiny_qwen2
from safetensors.torch import load_file, save_file
from transformers import Qwen2ForCausalLM

from inference.config import PRESETS, ModelConfig
from inference.model import ForwardBatch, SequenceChunk, Transformer, load_model

ATOL = 2e-5


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _prefill_logits(model: Transformer, tokens: list[int]) -> torch.Tensor:
    cache = model.new_cache(1, 64)
    batch = ForwardBatch.build([SequenceChunk(cache.allocate(), 0, tokens, logits="all")], "cpu")
    return model(batch, cache)


def _tokens(n: int, seed: int = 0) -> list[int]:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_llama_logits_match_transformers(tmp_path: Path) -> None:
    model_dir = save_tiny_llama(tmp_path / "llama")
    tokens = _tokens(11)
    expected = load_hf(model_dir)(torch.tensor([tokens])).logits[0]
    torch.testing.assert_close(
        _prefill_logits(load_model(model_dir), tokens), expected, atol=ATOL, rtol=0
    )


def test_qwen2_bias_and_tied_embeddings_match_transformers(tmp_path: Path) -> None:
    model_dir = save_tiny_qwen2(tmp_path / "qwen2")
    model = load_model(model_dir)
    assert model.config.attention_bias and model.lm_head is None
    tokens = _tokens(9, seed=1)
    reference = Qwen2ForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        expected = reference(torch.tensor([tokens])).logits[0]
    torch.testing.assert_close(_prefill_logits(model, tokens), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_projection_and_head_weights_load_column_major(tmp_path: Path, dtype) -> None:
    # The layout the CPU multiplies decode batches fastest with (see lora_layers.column_major)
    # survives building on the meta device, materialising and casting.
    model = load_model(save_tiny_llama(tmp_path / "llama"), dtype=dtype)
    weights = [model.embed_tokens.weight] + [
        linear.weight
        for layer in model.layers
        for linear in (layer.attention.wqkv, layer.attention.wo, layer.feed_forward.w_gate_up)
    ]
    assert all(w.dtype == dtype and w.t().is_contiguous() for w in weights)
    assert all(layer.feed_forward.w_down.weight.is_contiguous() for layer in model.layers)


def test_sharded_checkpoint_loads(tmp_path: Path) -> None:
    model_dir = tmp_path / "sharded"
    torch.manual_seed(0)
    hf = load_hf(save_tiny_llama(tmp_path / "whole"))
    hf.save_pretrained(model_dir, safe_serialization=True, max_shard_size="100KB")
    assert (model_dir / "model.safetensors.index.json").is_file()
    assert len(list(model_dir.glob("*.safetensors"))) > 1
    tokens = _tokens(7, seed=2)
    with torch.no_grad():
        expected = hf(torch.tensor([tokens])).logits[0]
    torch.testing.assert_close(
        _prefill_logits(load_model(model_dir), tokens), expected, atol=ATOL, rtol=0
    )


def test_llama3_rope_scaling_matches_transformers(tmp_path: Path) -> None:
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    model_dir = save_tiny_llama(tmp_path / "llama3", rope_scaling=scaling, rope_theta=500000.0)
    model = load_model(model_dir)
    assert model.config.rope_scaling is not None
    tokens = _tokens(40, seed=3)
    expected = load_hf(model_dir)(torch.tensor([tokens])).logits[0]
    torch.testing.assert_close(_prefill_logits(model, tokens), expected, atol=ATOL, rtol=0)


def test_chunked_prefill_and_mixed_batch_match_one_full_pass(tmp_path: Path) -> None:
    model = load_model(save_tiny_llama(tmp_path / "llama"))
    a, b = _tokens(12, seed=4), _tokens(5, seed=5)
    whole_a, whole_b = _prefill_logits(model, a), _prefill_logits(model, b)
    cache = model.new_cache(2, 64)
    row_a, row_b = cache.allocate(), cache.allocate()
    first = model(
        ForwardBatch.build(
            [SequenceChunk(row_a, 0, a[:4], logits="all"), SequenceChunk(row_b, 0, b[:1])], "cpu"
        ),
        cache,
    )
    # Chunk 2 of a beside the rest of b, then the last token of a alone as a decode step.
    second = model(
        ForwardBatch.build(
            [SequenceChunk(row_b, 1, b[1:], logits="all"), SequenceChunk(row_a, 4, a[4:11])],
            "cpu",
        ),
        cache,
    )
    third = model(ForwardBatch.build([SequenceChunk(row_a, 11, a[11:])], "cpu"), cache)
    torch.testing.assert_close(first[:4], whole_a[:4], atol=ATOL, rtol=0)
    torch.testing.assert_close(first[4], whole_b[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(second[:4], whole_b[1:], atol=ATOL, rtol=0)
    torch.testing.assert_close(second[4], whole_a[10], atol=ATOL, rtol=0)
    torch.testing.assert_close(third[0], whole_a[11], atol=ATOL, rtol=0)


def test_checkpoint_with_an_unexpected_tensor_is_refused(tmp_path: Path) -> None:
    model_dir = save_tiny_llama(tmp_path / "llama")
    weights = load_file(model_dir / "model.safetensors")
    weights["model.layers.0.mlp.extra_proj.weight"] = torch.zeros(2, 2)
    save_file(weights, model_dir / "model.safetensors")
    with pytest.raises(ValueError, match="unexpected tensor 'model.layers.0.mlp.extra_proj"):
        load_model(model_dir)


def test_checkpoint_missing_a_tensor_is_refused(tmp_path: Path) -> None:
    model_dir = save_tiny_llama(tmp_path / "llama")
    weights = load_file(model_dir / "model.safetensors")
    del weights["model.layers.1.mlp.down_proj.weight"]
    save_file(weights, model_dir / "model.safetensors")
    with pytest.raises(ValueError, match="lacks 1 tensors: model.layers.1.mlp.down_proj.weight"):
        load_model(model_dir)


def test_checkpoint_with_a_wrong_shape_is_refused(tmp_path: Path) -> None:
    model_dir = save_tiny_llama(tmp_path / "llama")
    config = json.loads((model_dir / "config.json").read_text())
    config["intermediate_size"] = 96
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"has shape \(\d+, \d+\) in the checkpoint, the config"):
        load_model(model_dir)


def test_config_reads_hf_configs_and_refuses_other_families() -> None:
    config = ModelConfig.from_hf_config({**TINY_HF, "model_type": "llama", "eos_token_id": [5, 6]})
    assert (config.hidden_size, config.num_kv_heads, config.head_dim) == (64, 2, 16)
    assert config.eos_token_ids == (5, 6)
    assert ModelConfig.from_hf_config(config.to_hf_config()) == config
    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'"):
        ModelConfig.from_hf_config({**TINY_HF, "model_type": "gpt2"})
    with pytest.raises(ValueError, match="only 'llama3'"):
        ModelConfig.from_hf_config({**TINY_HF, "rope_scaling": {"rope_type": "yarn", "factor": 2}})
    with pytest.raises(KeyError, match="unknown model preset 'huge'"):
        ModelConfig.from_preset("huge")
    tiny = ModelConfig.from_preset("tiny")
    assert (tiny.hidden_size, tiny.num_layers, tiny.vocab_size) == (64, 2, 256)
    assert {"tiny", "llama-3.2-1b", "qwen2.5-0.5b", "mistral-7b"} <= set(PRESETS)


def test_kv_cache_rows_are_allocated_and_freed() -> None:
    model = Transformer(ModelConfig.from_preset("tiny"), max_seq_len=32)
    cache = model.new_cache(2)
    rows = {cache.allocate(), cache.allocate()}
    assert rows == {0, 1} and cache.free_rows == 0
    with pytest.raises(RuntimeError, match="no free KV cache row"):
        cache.allocate()
    cache.free(0)
    cache.free(0)  # twice is harmless
    assert cache.free_rows == 1 and cache.allocate() == 0
