"""A compact Llama-family decoder (Llama, Mistral, Qwen2) with multi-LoRA projections.

Reads top to bottom: RMSNorm, rotary embeddings, grouped-query attention over a per-sequence KV
cache, SwiGLU, then the model and its Hugging Face safetensors loader. One forward pass takes a
mixed batch: one-token decode steps and multi-token prefill chunks of different sequences,
each with its own adapter (or none), flattened into `[num_tokens]`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import Tensor, nn

from inference.config import ModelConfig, RopeScaling
from inference.lora_layers import ActiveLora, MultiLoraLinear, column_major


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in float32 like the reference implementation, then cast back.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_inverse_frequencies(config: ModelConfig) -> Tensor:
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    if config.rope_scaling is not None:
        inv_freq = _llama3_scaled(inv_freq, config.rope_scaling)
    return inv_freq.float()


def _llama3_scaled(inv_freq: Tensor, scaling: RopeScaling) -> Tensor:
    """Llama 3.1's frequency-dependent stretch of long wavelengths."""
    old_len = scaling.original_max_position_embeddings
    low_wavelen = old_len / scaling.low_freq_factor
    high_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class KVCache:
    """Keys and values of up to `max_sequences` sequences, one row each.

    k[layer], v[layer]: [max_sequences, num_kv_heads, max_seq_len, head_dim]. A sequence owns a
    row from `allocate()` until `free(row)`.
    """

    def __init__(
        self,
        config: ModelConfig,
        max_sequences: int,
        max_seq_len: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        shape = (max_sequences, config.num_kv_heads, max_seq_len, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        self.max_sequences = max_sequences
        self.max_seq_len = max_seq_len
        self._free_rows = list(range(max_sequences - 1, -1, -1))

    @property
    def free_rows(self) -> int:
        return len(self._free_rows)

    def allocate(self) -> int:
        if not self._free_rows:
            raise RuntimeError("no free KV cache row; wait for a sequence to finish")
        return self._free_rows.pop()

    def clear(self, row: int) -> None:
        """Zero a row's keys and values. Decoding reads a row up to the batch's longest
        sequence, masked; a masked NaN or infinity still poisons the attention (0 * NaN), so
        a row that held non-finite values is cleared before it is reused."""
        for layer in range(len(self.k)):
            self.k[layer][row].zero_()
            self.v[layer][row].zero_()

    def free(self, row: int) -> None:
        """Return a row; freeing a row twice does nothing."""
        if row not in self._free_rows:
            self._free_rows.append(row)


@dataclass
class SequenceChunk:
    """The tokens one sequence contributes to a forward pass."""

    kv_row: int
    start_position: int  # position of token_ids[0]; the cache already holds positions before it
    token_ids: Sequence[int]
    logits: Literal["none", "last", "all"] = "last"
    lora_pool: int = -1  # index of the adapter's pool, -1 = base model only
    lora_slot: int = -1  # slot in that pool


@dataclass
class ForwardBatch:
    """Flattened metadata of one forward pass. One-token chunks come first so their attention
    runs as one batched call; longer chunks follow, each attending over its own cache row."""

    token_ids: Tensor  # [num_tokens] int64
    positions: Tensor  # [num_tokens] int64, position of each token in its sequence
    kv_rows: Tensor  # [num_tokens] int64, cache row of each token's sequence
    num_decode: int  # the first num_decode tokens are one-token chunks
    decode_rows: Tensor  # [num_decode] int64, their cache rows
    decode_lengths: Tensor  # [num_decode] int64, context length including the new token
    max_decode_length: int  # host copy of decode_lengths.max() (0 when num_decode == 0)
    # [num_decode, 1, 1, max_decode_length] bool, the cache positions each decode token sees;
    # built once per pass rather than once per layer.
    decode_mask: Tensor
    prefill_chunks: list[tuple[int, int, int, int]]  # (first token, num tokens, kv row, start pos)
    logits_index: Tensor  # [num_logits] int64, tokens whose next-token logits are returned
    token_pools: list[int]  # [num_tokens] pool index per token, -1 = no adapter
    token_slots: list[int]  # [num_tokens] slot per token in that pool

    @property
    def num_tokens(self) -> int:
        return self.token_ids.numel()

    @property
    def has_prefill(self) -> bool:
        return bool(self.prefill_chunks)

    @classmethod
    def build(cls, chunks: Sequence[SequenceChunk], device: torch.device | str) -> ForwardBatch:
        """Lay out `chunks`; logits come back in the order of `chunks` (rows of chunks with
        logits="none" are skipped, logits="all" gives one row per token)."""
        if not chunks:
            raise ValueError("a forward pass needs at least one chunk")
        decode = [i for i, c in enumerate(chunks) if len(c.token_ids) == 1]
        # Tokens of one adapter slot side by side: the LoRA kernels then see runs, not scatters.
        decode.sort(key=lambda i: (chunks[i].lora_pool, chunks[i].lora_slot))
        prefill = [i for i, c in enumerate(chunks) if len(c.token_ids) > 1]
        if any(len(c.token_ids) == 0 for c in chunks):
            raise ValueError("every chunk needs at least one token")
        token_ids: list[int] = []
        positions: list[int] = []
        kv_rows: list[int] = []
        token_pools: list[int] = []
        token_slots: list[int] = []
        first_token: dict[int, int] = {}
        prefill_chunks: list[tuple[int, int, int, int]] = []
        for i in decode + prefill:
            chunk = chunks[i]
            n = len(chunk.token_ids)
            first_token[i] = len(token_ids)
            if n > 1:
                prefill_chunks.append((len(token_ids), n, chunk.kv_row, chunk.start_position))
            token_ids.extend(chunk.token_ids)
            positions.extend(range(chunk.start_position, chunk.start_position + n))
            kv_rows.extend([chunk.kv_row] * n)
            token_pools.extend([chunk.lora_pool] * n)
            token_slots.extend([chunk.lora_slot] * n)
        logits_index: list[int] = []
        for i, chunk in enumerate(chunks):
            n = len(chunk.token_ids)
            if chunk.logits == "last":
                logits_index.append(first_token[i] + n - 1)
            elif chunk.logits == "all":
                logits_index.extend(range(first_token[i], first_token[i] + n))
        decode_lengths = [chunks[i].start_position + 1 for i in decode]

        def long(values: list[int]) -> Tensor:
            return torch.tensor(values, dtype=torch.int64, device=device)

        lengths = long(decode_lengths)
        max_length = max(decode_lengths, default=0)
        visible = torch.arange(max_length, device=device) < lengths[:, None]
        return cls(
            token_ids=long(token_ids),
            positions=long(positions),
            kv_rows=long(kv_rows),
            num_decode=len(decode),
            decode_rows=long([chunks[i].kv_row for i in decode]),
            decode_lengths=lengths,
            max_decode_length=max_length,
            decode_mask=visible[:, None, None, :],
            prefill_chunks=prefill_chunks,
            logits_index=long(logits_index),
            token_pools=token_pools,
            token_slots=token_slots,
        )


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        q_out, kv_out = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
        self.wqkv = MultiLoraLinear(
            "qkv_proj",
            config.hidden_size,
            (("q_proj", q_out), ("k_proj", kv_out), ("v_proj", kv_out)),
            layer_index,
            bias=config.attention_bias,
        )
        self.wo = MultiLoraLinear("o_proj", q_out, (("o_proj", config.hidden_size),), layer_index)
        self.layer_index = layer_index

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        batch: ForwardBatch,
        cache: KVCache,
        lora: Sequence[ActiveLora],
    ) -> Tensor:
        num_tokens = x.shape[0]
        qkv = self.wqkv(x, lora)
        q_out, kv_out = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q = qkv[:, :q_out].view(num_tokens, self.num_heads, self.head_dim)
        k = qkv[:, q_out : q_out + kv_out].view(num_tokens, self.num_kv_heads, self.head_dim)
        v = qkv[:, q_out + kv_out :].view(num_tokens, self.num_kv_heads, self.head_dim)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin

        k_cache, v_cache = cache.k[self.layer_index], cache.v[self.layer_index]
        k_cache[batch.kv_rows, :, batch.positions] = k
        v_cache[batch.kv_rows, :, batch.positions] = v

        out = torch.empty_like(q)
        if batch.num_decode:
            d, length = batch.num_decode, batch.max_decode_length
            keys = k_cache[batch.decode_rows, :, :length]  # [d, kv_heads, length, head_dim]
            values = v_cache[batch.decode_rows, :, :length]
            out[:d] = F.scaled_dot_product_attention(
                q[:d].unsqueeze(2),  # [d, heads, 1, head_dim]
                keys,
                values,
                attn_mask=batch.decode_mask,
                enable_gqa=True,
            ).squeeze(2)
        for first, n, row, start in batch.prefill_chunks:
            keys = k_cache[row, :, : start + n].unsqueeze(0)  # [1, kv_heads, start+n, head_dim]
            values = v_cache[row, :, : start + n].unsqueeze(0)
            queries = q[first : first + n].transpose(0, 1).unsqueeze(0)  # [1, heads, n, head_dim]
            if start == 0:
                attended = F.scaled_dot_product_attention(
                    queries, keys, values, is_causal=True, enable_gqa=True
                )
            else:
                query_pos = torch.arange(start, start + n, device=x.device)
                visible = torch.arange(start + n, device=x.device)[None, :] <= query_pos[:, None]
                attended = F.scaled_dot_product_attention(
                    queries, keys, values, attn_mask=visible, enable_gqa=True
                )
            out[first : first + n] = attended.squeeze(0).transpose(0, 1)
        return self.wo(out.view(num_tokens, q_out), lora)


class FeedForward(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.intermediate_size = config.intermediate_size
        self.w_gate_up = MultiLoraLinear(
            "gate_up_proj",
            config.hidden_size,
            (("gate_proj", config.intermediate_size), ("up_proj", config.intermediate_size)),
            layer_index,
        )
        # Row-major, as transformers keeps it: summed in the column-major blocking order, the
        # long dot products of down_proj drift from transformers' logits by more than 1e-4 on
        # a real checkpoint (SmolLM2: 1.2e-4 with it, 5e-5 without), for a few percent of a
        # decode step.
        self.w_down = MultiLoraLinear(
            "down_proj", config.intermediate_size, (("down_proj", config.hidden_size),),
            layer_index, weight_column_major=False,
        )

    def forward(self, x: Tensor, lora: Sequence[ActiveLora]) -> Tensor:
        gate_up = self.w_gate_up(x, lora)
        gate, up = gate_up[:, : self.intermediate_size], gate_up[:, self.intermediate_size :]
        return self.w_down(F.silu(gate) * up, lora)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.input_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attention = Attention(config, layer_index)
        self.post_attention_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.feed_forward = FeedForward(config, layer_index)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        batch: ForwardBatch,
        cache: KVCache,
        lora: Sequence[ActiveLora],
    ) -> Tensor:
        x = x + self.attention(self.input_norm(x), cos, sin, batch, cache, lora)
        return x + self.feed_forward(self.post_attention_norm(x), lora)


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig, max_seq_len: int | None = None) -> None:
        super().__init__()
        self.config = config
        self.max_seq_len = min(
            config.max_position_embeddings,
            config.sliding_window or config.max_position_embeddings,
            max_seq_len or 4096,
        )
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_tokens.weight = nn.Parameter(
            column_major(config.vocab_size, config.hidden_size), requires_grad=False
        )  # as the LM head when tied; an embedding lookup reads it in any layout
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = None
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
            self.lm_head.weight = nn.Parameter(
                column_major(config.vocab_size, config.hidden_size), requires_grad=False
            )
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        self.reset_rope()

    def reset_rope(self) -> None:
        """(Re)compute the float32 rotary tables [max_seq_len, head_dim] on the model's device."""
        device = self.embed_tokens.weight.device
        positions = torch.arange(self.max_seq_len, dtype=torch.float32, device=device)
        inv_freq = rope_inverse_frequencies(self.config).to(device)
        angles = torch.outer(positions, inv_freq)
        angles = torch.cat((angles, angles), dim=-1)
        self.rope_cos, self.rope_sin = angles.cos(), angles.sin()

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    def new_cache(self, max_sequences: int, max_seq_len: int | None = None) -> KVCache:
        length = min(max_seq_len or self.max_seq_len, self.max_seq_len)
        return KVCache(self.config, max_sequences, length, self.dtype, self.device)

    @torch.inference_mode()
    def forward(
        self, batch: ForwardBatch, cache: KVCache, lora: Sequence[ActiveLora] = ()
    ) -> Tensor:
        """Run the batch, filling the cache; returns float32 logits [num_logits, vocab_size]."""
        x = self.embed_tokens(batch.token_ids)
        cos = self.rope_cos[batch.positions].to(x.dtype).unsqueeze(1)  # [num_tokens, 1, head_dim]
        sin = self.rope_sin[batch.positions].to(x.dtype).unsqueeze(1)
        for layer in self.layers:
            x = layer(x, cos, sin, batch, cache, lora)
        x = self.norm(x[batch.logits_index])
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(x, weight).float()


# --- loading Hugging Face checkpoints ---------------------------------------------------------


def load_model(
    model_dir: Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    max_seq_len: int | None = None,
) -> Transformer:
    """Load a Llama / Mistral / Qwen2 checkpoint (config.json + *.safetensors) from a directory."""
    model_dir = Path(model_dir)
    config = ModelConfig.from_model_dir(model_dir)
    # Built without storage, then given uninitialised memory: every weight comes from the
    # checkpoint (load_hf_weights refuses a missing one), so random init would be wasted time.
    with torch.device("meta"):
        model = Transformer(config, max_seq_len=max_seq_len)
    model = model.to_empty(device=device).to(dtype=dtype)
    model.reset_rope()
    load_hf_weights(model, model_dir)
    return model.eval()


def _hf_parameter_map(model: Transformer) -> dict[str, tuple[Tensor, slice | None]]:
    """HF tensor name -> (our tensor, rows of it) ; fused projections take row slices."""
    mapping: dict[str, tuple[Tensor, slice | None]] = {
        "model.embed_tokens.weight": (model.embed_tokens.weight, None),
        "model.norm.weight": (model.norm.weight, None),
    }
    if model.lm_head is not None:
        mapping["lm_head.weight"] = (model.lm_head.weight, None)
    for i, layer in enumerate(model.layers):
        prefix = f"model.layers.{i}"
        mapping[f"{prefix}.input_layernorm.weight"] = (layer.input_norm.weight, None)
        mapping[f"{prefix}.post_attention_layernorm.weight"] = (
            layer.post_attention_norm.weight,
            None,
        )
        fused = (
            (layer.attention.wqkv, "self_attn"),
            (layer.attention.wo, "self_attn"),
            (layer.feed_forward.w_gate_up, "mlp"),
            (layer.feed_forward.w_down, "mlp"),
        )
        for linear, parent in fused:
            for target, rows in linear.parts:
                mapping[f"{prefix}.{parent}.{target}.weight"] = (linear.weight, rows)
                if linear.bias is not None:
                    mapping[f"{prefix}.{parent}.{target}.bias"] = (linear.bias, rows)
    return mapping


def load_hf_weights(model: Transformer, model_dir: Path) -> None:
    """Copy every tensor of the checkpoint into the model; refuse missing or unexpected ones."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        shard_names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        shards = [model_dir / name for name in shard_names]
    else:
        shards = sorted(model_dir.glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"no *.safetensors weights in {model_dir}")
    mapping = _hf_parameter_map(model)
    loaded: set[str] = set()
    with torch.no_grad():
        for shard in shards:
            with safe_open(str(shard), framework="pt", device="cpu") as handle:
                for name in handle.keys():  # noqa: SIM118 - safe_open is not a dict
                    if name.endswith("rotary_emb.inv_freq"):
                        continue  # recomputed from the config
                    if name == "lm_head.weight" and model.lm_head is None:
                        continue  # tied to the embedding
                    if name not in mapping:
                        raise ValueError(f"unexpected tensor {name!r} in {shard.name}")
                    target, rows = mapping[name]
                    source = handle.get_tensor(name)
                    destination = target if rows is None else target[rows]
                    if source.shape != destination.shape:
                        raise ValueError(
                            f"{name} has shape {tuple(source.shape)} in the checkpoint, the config "
                            f"implies {tuple(destination.shape)}"
                        )
                    destination.copy_(source)
                    loaded.add(name)
    missing = sorted(set(mapping) - loaded)
    if missing:
        shown = ", ".join(missing[:3]) + (" ..." if len(missing) > 3 else "")
        raise ValueError(f"checkpoint in {model_dir} lacks {len(missing)} tensors: {shown}")
