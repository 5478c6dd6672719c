"""A tiny Llama-family base model built locally: tokenizer, brief pretraining on the CPU, and
a Hugging Face checkpoint (safetensors + tokenizer) that any Llama loader reads.

Builds are deterministic (seeded, one thread, fixed data order) and cached outside the project
under `cache_dir / "base-model-<key>"`, where the key hashes the preset, the seed and the corpus
version; the checkpoint is then copied to the configured base model directory. A directory that
already holds a checkpoint not built here (a real model) is used as it is.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from inference.data import CORPUS_VERSION, general_corpus
from inference.hashing import base_model_hash
from inference.tokenizer import encode_prompts, load_tokenizer, save_tokenizer, train_tokenizer

BUILD_MARKER = "loraledger-build.json"
# Bumped when the build procedure changes the checkpoint's files (weights or tokenizer).
# 2: the tokenizer declares its BOS in its own rules (a post-processor template).
BUILD_VERSION = 2

ProgressFn = Callable[[int, int, float], None]  # (step, total_steps, loss)


@dataclass(frozen=True)
class BasePreset:
    name: str
    vocab_size: int  # upper bound: the tokenizer may learn fewer merges on a small corpus
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    max_position_embeddings: int
    documents: int  # general-corpus documents for the tokenizer and pretraining
    steps: int
    batch_size: int
    seq_len: int
    lr: float


PRESETS: dict[str, BasePreset] = {
    # About a minute of pretraining on one CPU thread.
    "default": BasePreset(
        name="default",
        vocab_size=2048,
        hidden_size=128,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=344,
        max_position_embeddings=512,
        documents=6000,
        steps=400,
        batch_size=16,
        seq_len=64,
        lr=3e-3,
    ),
    # Seconds: for tests.
    "test": BasePreset(
        name="test",
        vocab_size=1024,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=128,
        max_position_embeddings=256,
        documents=1500,
        steps=150,
        batch_size=8,
        seq_len=64,
        lr=5e-3,
    ),
}


@dataclass(frozen=True)
class BaseModelInfo:
    directory: Path
    weights_hash: str
    source: str  # "built", "cache", "up-to-date" or "external"
    key: str | None  # cache key of a model built here; None for an external checkpoint


def preset(name: str) -> BasePreset:
    if name not in PRESETS:
        raise KeyError(f"unknown base model preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]


def cache_key(base: BasePreset, seed: int) -> str:
    payload = json.dumps(
        {"preset": asdict(base), "seed": seed, "corpus": CORPUS_VERSION, "build": BUILD_VERSION},
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def is_checkpoint(directory: Path) -> bool:
    """A Hugging Face checkpoint with safetensors weights and a tokenizer."""
    directory = Path(directory)
    return (
        (directory / "config.json").is_file()
        and any(directory.glob("*.safetensors"))
        and (directory / "tokenizer.json").is_file()
    )


def built_here(directory: Path) -> dict | None:
    """The build record of a checkpoint built by `build_base_model`, or None."""
    marker = Path(directory) / BUILD_MARKER
    return json.loads(marker.read_text()) if marker.is_file() else None


@contextmanager
def single_thread() -> Iterator[None]:
    """One intra-op thread: CPU float reductions then run in one fixed order."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def llama_config(base: BasePreset, tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=base.hidden_size,
        num_hidden_layers=base.num_layers,
        num_attention_heads=base.num_heads,
        num_key_value_heads=base.num_kv_heads,
        intermediate_size=base.intermediate_size,
        max_position_embeddings=base.max_position_embeddings,
        head_dim=base.hidden_size // base.num_heads,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _token_blocks(
    tokenizer: PreTrainedTokenizerFast, texts: list[str], seq_len: int
) -> torch.Tensor:
    """The corpus as one stream (bos doc eos bos doc eos ...) cut into [n, seq_len] blocks;
    each document is encoded as a prompt is, so it starts with the tokenizer's BOS."""
    stream: list[int] = []
    for ids in encode_prompts(tokenizer, texts):
        stream.extend([*ids, tokenizer.eos_token_id])
    usable = len(stream) // seq_len * seq_len
    return torch.tensor(stream[:usable], dtype=torch.long).view(-1, seq_len)


def pretrain(
    base: BasePreset, seed: int, out_dir: Path, progress: ProgressFn | None = None
) -> float:
    """Train tokenizer and model from scratch and save them to `out_dir`; returns the loss of
    the last step."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    texts = general_corpus(seed=seed, documents=base.documents)
    tokenizer = train_tokenizer(texts, base.vocab_size)
    with single_thread():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(llama_config(base, tokenizer))
        model.train()
        blocks = _token_blocks(tokenizer, texts, base.seq_len)
        order_rng = torch.Generator().manual_seed(seed)
        optimizer = torch.optim.AdamW(model.parameters(), lr=base.lr, weight_decay=0.01)
        warmup = max(1, base.steps // 10)

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, base.steps - warmup)))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        order = torch.randperm(len(blocks), generator=order_rng)
        cursor = 0
        loss_value = float("nan")
        for step in range(base.steps):
            if cursor + base.batch_size > len(order):
                order = torch.randperm(len(blocks), generator=order_rng)
                cursor = 0
            batch = blocks[order[cursor : cursor + base.batch_size]]
            cursor += base.batch_size
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            loss_value = loss.item()
            if progress is not None:
                progress(step + 1, base.steps, loss_value)
    model.eval()
    model.save_pretrained(str(out_dir), safe_serialization=True)
    save_tokenizer(tokenizer, out_dir)
    return loss_value


def build_base_model(
    base_model_dir: Path,
    cache_dir: Path,
    preset_name: str = "default",
    seed: int = 0,
    force: bool = False,
    progress: ProgressFn | None = None,
) -> BaseModelInfo:
    """Make `base_model_dir` hold a base model checkpoint, building it only when needed."""
    base_model_dir = Path(base_model_dir)
    if is_checkpoint(base_model_dir) and built_here(base_model_dir) is None:
        if force:
            raise FileExistsError(
                f"{base_model_dir} holds a checkpoint not built by loraledger; refusing to "
                "overwrite it: point LORALEDGER_BASE_MODEL at another directory"
            )
        return BaseModelInfo(base_model_dir, base_model_hash(base_model_dir), "external", None)
    base = preset(preset_name)
    key = cache_key(base, seed)
    cached = Path(cache_dir) / f"base-model-{key}"
    source = "cache"
    if force or not is_checkpoint(cached):
        staging = cached.with_name(f".{cached.name}.{os.getpid()}.staging")
        shutil.rmtree(staging, ignore_errors=True)
        final_loss = pretrain(base, seed, staging, progress)
        record = {
            "preset": base.name,
            "seed": seed,
            "key": key,
            "corpus": CORPUS_VERSION,
            "final_loss": round(final_loss, 6),
        }
        (staging / BUILD_MARKER).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        shutil.rmtree(cached, ignore_errors=True)
        os.replace(staging, cached)
        source = "built"
    current = built_here(base_model_dir) if is_checkpoint(base_model_dir) else None
    if current is not None and current.get("key") == key and source == "cache":
        return BaseModelInfo(base_model_dir, base_model_hash(base_model_dir), "up-to-date", key)
    _replace_dir_contents(cached, base_model_dir)
    return BaseModelInfo(base_model_dir, base_model_hash(base_model_dir), source, key)


def _replace_dir_contents(source: Path, target: Path) -> None:
    staging = target.with_name(f".{target.name}.{os.getpid()}.staging")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(source, staging)
    if target.exists():
        shutil.rmtree(target)
    os.replace(staging, target)


def load_base_model(
    directory: Path, device: str | torch.device = "cpu"
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerBase]:
    """Load a checkpoint (safetensors only) and its tokenizer, in float32, eval mode."""
    directory = Path(directory)
    if not is_checkpoint(directory):
        raise FileNotFoundError(
            f"no base model checkpoint in {directory}: run `loraledger base-model build`"
        )
    model = LlamaForCausalLM.from_pretrained(
        str(directory), use_safetensors=True, dtype=torch.float32
    )
    model.to(device)
    model.eval()
    return model, load_tokenizer(directory)
