"""Random PEFT adapters for the worker's tests and benchmark: a store of many adapters in
seconds, without training. Some can carry an attribution index (random training features, but
the real projection parameters and parameter layout), so the worker's sketches are exercised
exactly as for a trained adapter."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from inference.adapter_store import AdapterStore
from inference.adapters import save_peft_adapter
from inference.attribution_index import TRAK, IndexExample, write_index
from inference.config import ModelConfig
from inference.sketch import LOSS_DEFINITION, PROJECTION_KIND, layout_hash
from schemas.text import row_id_for

DEFAULT_TARGETS: tuple[str, ...] = ("q_proj", "v_proj")


def lora_layout(
    config: ModelConfig, rank: int, targets: Sequence[str]
) -> list[tuple[str, tuple[int, int]]]:
    """The (canonical name, shape) of every LoRA weight, sorted by name, as
    `inference.sketch.param_layout` reads it from a peft model."""
    layout = []
    for layer in range(config.num_layers):
        for target in targets:
            parent = "mlp" if target in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            prefix = f"base_model.model.model.layers.{layer}.{parent}.{target}"
            in_features, out_features = config.projection_shape(target)
            layout.append((f"{prefix}.lora_A.weight", (rank, in_features)))
            layout.append((f"{prefix}.lora_B.weight", (out_features, rank)))
    return sorted(layout)


def write_random_adapter(
    adapters_dir: Path,
    adapter_id: str,
    config: ModelConfig,
    *,
    rank: int = 4,
    targets: Sequence[str] = DEFAULT_TARGETS,
    seed: int = 0,
    scale: float = 0.05,
    index_examples: int = 0,
    index_k: int = 32,
    index_seed: int = 0,
    max_length: int = 64,
    projection: str = PROJECTION_KIND,
) -> Path:
    """Write one adapter with N(0, scale^2) weights; with `index_examples` > 0, also an
    attribution index of that many random examples. Returns the adapter directory."""
    directory = AdapterStore(adapters_dir).adapter_dir(adapter_id)
    generator = torch.Generator().manual_seed(seed)
    modules = {}
    for layer in range(config.num_layers):
        for target in targets:
            in_features, out_features = config.projection_shape(target)
            a = torch.randn(rank, in_features, generator=generator) * scale
            b = torch.randn(out_features, rank, generator=generator) * scale
            modules[(layer, target)] = (a, b)
    save_peft_adapter(directory.path, modules, lora_alpha=2.0 * rank)
    if index_examples > 0:
        rng = np.random.default_rng(seed)
        texts = [f"example {i} of {adapter_id}" for i in range(index_examples)]
        write_index(
            directory.index_dir,
            rng.standard_normal((index_examples, index_k)).astype(np.float32),
            [
                IndexExample(i, row_id_for(text), f"contributor-{i % 3}", "datanet-0", text)
                for i, text in enumerate(texts)
            ],
            seed=index_seed,
            projection=projection,
            loss=LOSS_DEFINITION,
            param_layout_hash=layout_hash(lora_layout(config, rank, targets)),
            max_length=max_length,
            estimator=TRAK,
        )
    return directory.path


def write_random_adapters(
    adapters_dir: Path,
    adapter_ids: Sequence[str],
    config: ModelConfig,
    *,
    rank: int = 4,
    indexed: Sequence[str] = (),
    seed: int = 0,
) -> list[Path]:
    """Many random adapters; those named in `indexed` get an attribution index."""
    wanted = set(indexed)
    return [
        write_random_adapter(
            adapters_dir,
            adapter_id,
            config,
            rank=rank,
            seed=seed * 1_000_003 + number,
            index_examples=8 if adapter_id in wanted else 0,
        )
        for number, adapter_id in enumerate(adapter_ids)
    ]
