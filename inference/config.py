"""Model and LoRA-serving configuration: small dataclasses with presets by name.

`ModelConfig` describes a Llama-family decoder (Llama, Mistral, Qwen2). It is read from a
Hugging Face `config.json` or taken from a preset; the built-in `tiny` preset serves tests and
the local demo. `LoraServingConfig` sizes the adapter slots and caches.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# The projections LoRA may target, in the order a decoder layer runs them.
LORA_TARGETS: tuple[str, ...] = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)

SUPPORTED_MODEL_TYPES: tuple[str, ...] = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.x frequency scaling ("rope_type": "llama3"); other kinds are refused."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    attention_bias: bool = False  # Qwen2 puts a bias on q, k and v
    tie_word_embeddings: bool = False
    rope_scaling: RopeScaling | None = None
    model_type: str = "llama"
    head_dim_override: int | None = None  # configs whose head_dim != hidden / heads
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    # Mistral-style local attention: sequences are capped at this length so that full
    # attention over the cache stays exact.
    sliding_window: int | None = None

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model_type {self.model_type!r}; "
                f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of "
                f"num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim_override is None and self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be a multiple of "
                f"num_heads ({self.num_heads})"
            )

    @property
    def head_dim(self) -> int:
        return self.head_dim_override or self.hidden_size // self.num_heads

    def projection_shape(self, target: str) -> tuple[int, int]:
        """(in_features, out_features) of one LoRA-targetable projection."""
        q_out = self.num_heads * self.head_dim
        kv_out = self.num_kv_heads * self.head_dim
        shapes = {
            "q_proj": (self.hidden_size, q_out),
            "k_proj": (self.hidden_size, kv_out),
            "v_proj": (self.hidden_size, kv_out),
            "o_proj": (q_out, self.hidden_size),
            "gate_proj": (self.hidden_size, self.intermediate_size),
            "up_proj": (self.hidden_size, self.intermediate_size),
            "down_proj": (self.intermediate_size, self.hidden_size),
        }
        if target not in shapes:
            raise KeyError(f"unknown projection {target!r}; known: {', '.join(LORA_TARGETS)}")
        return shapes[target]

    @classmethod
    def from_preset(cls, name: str) -> ModelConfig:
        if name not in PRESETS:
            raise KeyError(f"unknown model preset {name!r}; known: {', '.join(sorted(PRESETS))}")
        return PRESETS[name]

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any]) -> ModelConfig:
        """Read a Hugging Face `config.json` dict of a Llama, Mistral or Qwen2 model."""
        model_type = hf.get("model_type", "llama")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model_type {model_type!r} in config.json; "
                f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        num_heads = int(hf["num_attention_heads"])
        hidden = int(hf["hidden_size"])
        head_dim = hf.get("head_dim")
        if hf.get("mlp_bias"):
            raise ValueError("config.json sets mlp_bias; only bias-free MLPs are supported")
        # transformers >= 5 nests rope settings (theta included) under rope_parameters.
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        rope_theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        sliding = hf.get("sliding_window") if hf.get("use_sliding_window", True) else None
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        return cls(
            vocab_size=int(hf["vocab_size"]),
            hidden_size=hidden,
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
            intermediate_size=int(hf["intermediate_size"]),
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            rope_theta=float(rope_theta),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            attention_bias=bool(hf.get("attention_bias", model_type == "qwen2")),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            rope_scaling=_read_rope_scaling(rope),
            sliding_window=int(sliding) if sliding else None,
            model_type=model_type,
            head_dim_override=(
                int(head_dim) if head_dim and int(head_dim) != hidden // num_heads else None
            ),
            eos_token_ids=eos_ids,
            bos_token_id=hf.get("bos_token_id"),
        )

    @classmethod
    def from_model_dir(cls, model_dir: Path) -> ModelConfig:
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"no config.json in {model_dir}; expected a Hugging Face checkpoint"
            )
        return cls.from_hf_config(json.loads(path.read_text()))

    def to_hf_config(self) -> dict[str, Any]:
        """The `config.json` a Hugging Face checkpoint of this model carries."""
        architectures = {
            "llama": "LlamaForCausalLM",
            "mistral": "MistralForCausalLM",
            "qwen2": "Qwen2ForCausalLM",
        }
        hf: dict[str, Any] = {
            "architectures": [architectures[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "intermediate_size": self.intermediate_size,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "head_dim": self.head_dim,
        }
        if self.model_type == "llama":
            hf["attention_bias"] = self.attention_bias
        if self.rope_scaling is not None:
            hf["rope_scaling"] = {"rope_type": "llama3", **asdict(self.rope_scaling)}
        if self.sliding_window is not None:
            hf["sliding_window"] = self.sliding_window
        if self.eos_token_ids:
            hf["eos_token_id"] = (
                self.eos_token_ids[0] if len(self.eos_token_ids) == 1 else list(self.eos_token_ids)
            )
        if self.bos_token_id is not None:
            hf["bos_token_id"] = self.bos_token_id
        return hf


def _read_rope_scaling(raw: dict[str, Any] | None) -> RopeScaling | None:
    if not raw:
        return None
    kind = raw.get("rope_type", raw.get("type"))
    if kind in (None, "default"):
        return None
    if kind != "llama3":
        raise ValueError(f"unsupported rope_scaling type {kind!r}; only 'llama3' is supported")
    return RopeScaling(
        factor=float(raw["factor"]),
        low_freq_factor=float(raw["low_freq_factor"]),
        high_freq_factor=float(raw["high_freq_factor"]),
        original_max_position_embeddings=int(raw["original_max_position_embeddings"]),
    )


PRESETS: dict[str, ModelConfig] = {
    # Tests and the local demo: small enough to train and serve on a laptop CPU.
    "tiny": ModelConfig(
        vocab_size=256,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=128,
        max_position_embeddings=512,
    ),
    "llama-3.2-1b": ModelConfig(
        vocab_size=128256,
        hidden_size=2048,
        num_layers=16,
        num_heads=32,
        num_kv_heads=8,
        intermediate_size=8192,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        tie_word_embeddings=True,
        rope_scaling=RopeScaling(32.0, 1.0, 4.0, 8192),
        head_dim_override=None,
        eos_token_ids=(128001,),
        bos_token_id=128000,
    ),
    "qwen2.5-0.5b": ModelConfig(
        vocab_size=151936,
        hidden_size=896,
        num_layers=24,
        num_heads=14,
        num_kv_heads=2,
        intermediate_size=4864,
        max_position_embeddings=32768,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        attention_bias=True,
        tie_word_embeddings=True,
        model_type="qwen2",
        eos_token_ids=(151643,),
    ),
    "mistral-7b": ModelConfig(
        vocab_size=32000,
        hidden_size=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        intermediate_size=14336,
        max_position_embeddings=32768,
        rope_theta=1000000.0,
        model_type="mistral",
        eos_token_ids=(2,),
        bos_token_id=1,
    ),
}


@dataclass(frozen=True)
class LoraServingConfig:
    """How adapters are held: rank classes of the device pools and the tier budgets."""

    rank_classes: tuple[int, ...] = (8, 16, 32, 64)
    # Bytes of device memory for all adapter slots, split across rank classes by `class_shares`;
    # None: sized from the model, so every rank class has slots (see inference.slot_plan).
    device_budget_bytes: int | None = None
    # Fraction of the device budget per rank class (same order as rank_classes); None = equal.
    class_shares: tuple[float, ...] | None = None
    # Exact slot counts per rank class (overrides the budget), e.g. for tests and benchmarks.
    slots_per_class: tuple[int, ...] | None = None
    host_budget_bytes: int = 512 << 20
    target_modules: tuple[str, ...] = field(default=LORA_TARGETS)
    load_workers: int = 1  # threads reading adapters from disk for prefetch
    # A disk read of one adapter that takes longer fails it (stuck or very slow storage), so a
    # request never waits on it for ever; the adapter is retried once its files change.
    load_timeout_s: float = 30.0
    # The fused layout (q|k|v, gate|up: one shrink per fused layer, computed by the torch path)
    # instead of one kernel call per projection: fewer, larger calls. None = fuse on the CPU,
    # where per-call overhead dominates, and not on accelerators, which run the Triton kernels.
    fuse_projections: bool | None = None

    def __post_init__(self) -> None:
        if not self.rank_classes or list(self.rank_classes) != sorted(set(self.rank_classes)):
            raise ValueError("rank_classes must be distinct and increasing, e.g. (8, 16, 32, 64)")
        if self.class_shares is not None and len(self.class_shares) != len(self.rank_classes):
            raise ValueError("class_shares needs one share per rank class")
        if self.slots_per_class is not None and len(self.slots_per_class) != len(self.rank_classes):
            raise ValueError("slots_per_class needs one count per rank class")
        if self.load_workers < 1 or not self.load_timeout_s > 0:
            raise ValueError("load_workers must be >= 1 and load_timeout_s > 0")
        if self.device_budget_bytes is not None and self.device_budget_bytes < 1:
            raise ValueError(f"device_budget_bytes must be >= 1, got {self.device_budget_bytes}")
        unknown = set(self.target_modules) - set(LORA_TARGETS)
        if unknown:
            raise ValueError(f"unknown target modules {sorted(unknown)}; known: {LORA_TARGETS}")
