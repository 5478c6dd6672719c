"""Install a released checkpoint as the base model: a Hugging Face directory (safetensors
weights) or a GGUF file, dequantized to float32 with transformers' GGUF loader (which reads the
file with the `gguf` package).

The installed directory is an ordinary Hugging Face checkpoint (config.json, *.safetensors, the
tokenizer and its chat template), so the worker, training and verification read it like any
other. A GGUF file is converted once: the result is cached under `cache_dir`, keyed by the
sha256 of the file, and later imports of the same file copy it from there.

Only what loraledger can serve is accepted: Llama, Mistral and Qwen2 decoders, and weights that
load without pickle (a directory of `*.bin` files is refused, never unpickled).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import PreTrainedTokenizerBase

from inference.config import SUPPORTED_MODEL_TYPES, ModelConfig
from inference.hashing import base_model_hash, sha256_file
from inference.model import load_model
from inference.tokenizer import load_tokenizer

# Files of a Hugging Face checkpoint that the installed copy keeps, besides the weights.
CHECKPOINT_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# GGUF architectures (general.architecture) that load into a supported decoder; llama.cpp
# names Mistral checkpoints "llama".
GGUF_ARCHITECTURES = ("llama", "qwen2")
SUPPORTED_NAMES = "Llama, Mistral or Qwen2"
WEIGHTS_FILE = "model.safetensors"


class ImportRefused(ValueError):
    """The source cannot be installed; the message says why and what to do, in one line."""


@dataclass(frozen=True)
class ImportedCheckpoint:
    directory: Path
    source_format: Literal["safetensors", "gguf"]
    architecture: str  # e.g. "LlamaForCausalLM"
    parameters: int  # distinct parameters (tied embeddings counted once)
    weights_hash: str  # the base model hash adapters are bound to
    has_chat_template: bool
    from_cache: bool  # a GGUF conversion reused from the cache


def import_checkpoint(source: Path, target: Path, cache_dir: Path) -> ImportedCheckpoint:
    """Install `source` (a checkpoint directory or a .gguf file) into `target`, replacing what
    was there. Raises ImportRefused for sources that cannot be served."""
    source, target = Path(source).resolve(), Path(target)
    if target.exists() and target.resolve() == source:
        raise ImportRefused(f"{source} is already the base model directory; nothing to import")
    if source.is_dir():
        _check_directory(source)
        return _describe(_install(source, target), "safetensors", from_cache=False)
    if source.is_file() and source.suffix == ".gguf":
        converted, from_cache = gguf_conversion(source, Path(cache_dir))
        return _describe(_install(converted, target), "gguf", from_cache=from_cache)
    if source.is_file() and source.suffix in PICKLE_SUFFIXES:
        raise _pickle_refusal(source)
    raise ImportRefused(
        f"{source} is neither a checkpoint directory nor a .gguf file: pass a Hugging Face "
        "directory with config.json and *.safetensors, or a GGUF file"
    )


# --- Hugging Face directories -------------------------------------------------------------


def _pickle_refusal(path: Path) -> ImportRefused:
    return ImportRefused(
        f"{path} holds pickle weights, which loraledger never loads: convert them to "
        "safetensors (transformers' save_pretrained(..., safe_serialization=True)) and import "
        "that directory"
    )


def _check_directory(source: Path) -> None:
    if not (source / "config.json").is_file():
        raise ImportRefused(f"no config.json in {source}: pass a Hugging Face checkpoint directory")
    if not any(source.glob("*.safetensors")):
        pickled = sorted(p for p in source.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickled:
            raise _pickle_refusal(pickled[0])
        raise ImportRefused(f"no *.safetensors weights in {source}")
    if not (source / "tokenizer.json").is_file():
        raise ImportRefused(
            f"no tokenizer.json in {source}: save the checkpoint's fast tokenizer beside it "
            "(AutoTokenizer.from_pretrained(...).save_pretrained(...))"
        )
    _supported_config(json.loads((source / "config.json").read_text()), source)
    _check_loads(source)


def _check_loads(directory: Path) -> None:
    """Every tensor named and shaped as the config says (read, never kept: the meta device),
    and a tokenizer transformers loads."""
    try:
        load_model(directory, device="meta")
        load_tokenizer(directory)
    except (ValueError, OSError) as exc:
        raise ImportRefused(f"{directory}: {str(exc).splitlines()[0]}") from None


def _supported_config(hf_config: dict, source: Path) -> ModelConfig:
    model_type = hf_config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ImportRefused(
            f"{source} is a {model_type!r} model; loraledger serves {SUPPORTED_NAMES} "
            "checkpoints: import one of those"
        )
    try:
        return ModelConfig.from_hf_config(hf_config)
    except (KeyError, ValueError) as exc:
        raise ImportRefused(f"{source}: {exc}") from None


def _install(checkpoint: Path, target: Path) -> Path:
    """Copy a checked checkpoint into a staging directory beside `target`, then swap it in, so
    a failed copy leaves the previous base model in place."""
    staging = target.with_name(f".{target.name}.{os.getpid()}.import")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        for path in sorted(checkpoint.iterdir()):
            if path.name in CHECKPOINT_FILES or path.suffix == ".safetensors":
                shutil.copy2(path, staging / path.name)
    except Exception:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if target.exists():
        shutil.rmtree(target)
    os.replace(staging, target)
    return target


def _describe(
    directory: Path, source_format: Literal["safetensors", "gguf"], *, from_cache: bool
) -> ImportedCheckpoint:
    hf_config = json.loads((directory / "config.json").read_text())
    architectures = hf_config.get("architectures") or [hf_config["model_type"]]
    parameters = 0
    for shard in sorted(directory.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open is not a dict
                shape = handle.get_slice(name).get_shape()
                parameters += int(torch.Size(shape).numel())
    return ImportedCheckpoint(
        directory=directory,
        source_format=source_format,
        architecture=architectures[0],
        parameters=parameters,
        weights_hash=base_model_hash(directory),
        has_chat_template=bool(getattr(load_tokenizer(directory), "chat_template", None)),
        from_cache=from_cache,
    )


# --- GGUF files ---------------------------------------------------------------------------


def gguf_cache_dir(cache_dir: Path, gguf_sha256: str) -> Path:
    """Where the conversion of the GGUF file with this hash is cached."""
    return Path(cache_dir) / f"checkpoint-gguf-{gguf_sha256[:16]}"


def gguf_conversion(source: Path, cache_dir: Path) -> tuple[Path, bool]:
    """The Hugging Face checkpoint converted from `source` (from the cache, or made now), and
    whether it came from the cache."""
    cached = gguf_cache_dir(cache_dir, sha256_file(source))
    if (cached / "config.json").is_file() and (cached / WEIGHTS_FILE).is_file():
        return cached, True
    metadata = _gguf_metadata(source)
    architecture = metadata.get("general.architecture")
    if architecture not in GGUF_ARCHITECTURES:
        raise ImportRefused(
            f"{source} holds a {architecture!r} model; loraledger serves {SUPPORTED_NAMES} "
            "checkpoints: import one of those"
        )
    staging = cached.with_name(f".{cached.name}.{os.getpid()}.staging")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        _convert_gguf(source, metadata, staging)
        _check_loads(staging)
    except Exception:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(cached, ignore_errors=True)
    os.replace(staging, cached)
    return cached, False


def _gguf_metadata(path: Path) -> dict[str, object]:
    """The GGUF fields the import reads, parsed as transformers parses them."""
    from gguf import GGUFReader
    from transformers.modeling_gguf_pytorch_utils import read_field

    reader = GGUFReader(str(path))
    fields: dict[str, object] = {
        "tokenizer.ggml.tokens": read_field(reader, "tokenizer.ggml.tokens")
    }
    for name in (
        "general.architecture",
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.padding_token_id",
        "tokenizer.ggml.unknown_token_id",
        "tokenizer.ggml.add_bos_token",
        "tokenizer.ggml.add_eos_token",
    ):
        value = read_field(reader, name)
        if value:
            fields[name] = value[0]
    return fields


def _convert_gguf(source: Path, metadata: dict[str, object], out_dir: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    folder, name = str(source.parent), source.name
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    _supported_config(config.to_dict(), source)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    _apply_gguf_special_tokens(tokenizer, metadata)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    state = model.state_dict()
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    # Quantized models refuse save_pretrained; the dequantized tensors are plain float32.
    save_file(
        {key: value.detach().contiguous().clone() for key, value in sorted(state.items())},
        str(out_dir / WEIGHTS_FILE),
        metadata={"format": "pt"},
    )
    config.architectures = [type(model).__name__]
    config.save_pretrained(str(out_dir))
    GenerationConfig.from_model_config(config).save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))


def _apply_gguf_special_tokens(
    tokenizer: PreTrainedTokenizerBase, metadata: dict[str, object]
) -> None:
    """Name the special tokens the GGUF file declares (transformers' conversion may take the
    end-of-sequence token for the beginning one), and add BOS or EOS to encoded texts as the
    file's add_bos_token / add_eos_token say."""
    from tokenizers import processors

    tokens = metadata["tokenizer.ggml.tokens"]
    roles = {
        "bos_token": "tokenizer.ggml.bos_token_id",
        "eos_token": "tokenizer.ggml.eos_token_id",
        "pad_token": "tokenizer.ggml.padding_token_id",
        "unk_token": "tokenizer.ggml.unknown_token_id",
    }
    for role, key in roles.items():
        token_id = metadata.get(key)
        if isinstance(token_id, int) and 0 <= token_id < len(tokens):
            setattr(tokenizer, role, tokens[token_id])
    add_bos = metadata.get("tokenizer.ggml.add_bos_token")
    add_eos = metadata.get("tokenizer.ggml.add_eos_token")
    if add_bos is None and add_eos is None:
        return
    bos = tokenizer.bos_token if add_bos and tokenizer.bos_token is not None else None
    eos = tokenizer.eos_token if add_eos and tokenizer.eos_token is not None else None
    single = " ".join([*([f"{bos}:0"] if bos else []), "$A:0", *([f"{eos}:0"] if eos else [])])
    pair = single + " " + " ".join(
        [*([f"{bos}:1"] if bos else []), "$B:1", *([f"{eos}:1"] if eos else [])]
    )
    specials = [(token, tokenizer.convert_tokens_to_ids(token)) for token in (bos, eos) if token]
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=specials
    )
