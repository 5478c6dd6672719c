"""PEFT LoRA adapters: reading and validating their weights for a base model, and writing them.

An adapter directory (see `inference.adapter_store`) holds peft's config and weights files,
plus an optional manifest whose `base_model_hash` and `adapter_hash` pin the base model and
the adapter's files. Anything that would make the served model differ from what peft computes
is refused with a one-line reason, and so is any config value outside sane bounds: a rank above
the server's maximum, a lora_alpha that is not a finite number in (0, MAX_LORA_ALPHA], and
rank_pattern/alpha_pattern keys that are not plain module-name suffixes. peft reads those keys
as regular expressions; here they are matched literally, so reading a config takes time linear
in its size whatever it holds.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file
from torch import Tensor

from inference.adapter_store import AdapterDir, AdapterFiles, AdapterRefused, check_integrity
from inference.config import LORA_TARGETS, ModelConfig

_PEFT_DEFAULT_ALPHA = 8  # peft's LoraConfig default when a config leaves lora_alpha out
# lora_alpha bound: the largest scale (alpha / r, or alpha / sqrt(r) with rslora) is 4096, far
# above what training uses (alpha is usually r or 2r) and far below float overflow.
MAX_LORA_ALPHA = 4096.0
# rank_pattern/alpha_pattern: at most this many keys, each a dotted module-name suffix.
MAX_PATTERN_KEYS = 1024
MAX_PATTERN_KEY_CHARS = 256
_PATTERN_KEY = re.compile(r"[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*")

# The module holding each adaptable projection in a Llama-family checkpoint.
PROJECTION_PARENT = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}

# peft names weights `base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight`; older
# versions keep the adapter name (`lora_A.default.weight`).
_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?:model\.)?layers\.(?P<layer>\d+)\."
    r"(?P<parent>self_attn|mlp)\.(?P<target>[a-z_]+)\.lora_(?P<ab>[AB])(?:\.[A-Za-z0-9_-]+)?\.weight$"
)


@dataclass(frozen=True)
class LoraModule:
    """One adapted projection: delta(x) = scale * (x @ a.T) @ b.T."""

    a: Tensor  # [rank, in_features]
    b: Tensor  # [out_features, rank]
    scale: float

    @property
    def rank(self) -> int:
        return self.a.shape[0]


@dataclass
class AdapterWeights:
    """An adapter in host memory, validated against the base model."""

    adapter_id: str
    version: str  # the adapter hash: sha256 over its config and weights files
    modules: dict[tuple[int, str], LoraModule]  # (layer index, target) -> weights

    @property
    def rank(self) -> int:
        """The largest rank of any module: decides the adapter's device rank class."""
        return max(m.rank for m in self.modules.values())

    @property
    def nbytes(self) -> int:
        return sum(
            m.a.numel() * m.a.element_size() + m.b.numel() * m.b.element_size()
            for m in self.modules.values()
        )

    def pin_memory(self) -> AdapterWeights:
        """Page-locked copies, so host-to-device uploads can run asynchronously on CUDA."""
        pinned = {
            key: LoraModule(m.a.pin_memory(), m.b.pin_memory(), m.scale)
            for key, m in self.modules.items()
        }
        return AdapterWeights(self.adapter_id, self.version, pinned)


def load_peft_adapter(
    adapter_dir: Path,
    model_config: ModelConfig,
    *,
    max_rank: int,
    target_modules: tuple[str, ...] = LORA_TARGETS,
    adapter_id: str | None = None,
    base_model_hash: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> AdapterWeights:
    """Read and validate a PEFT LoRA adapter directory for `model_config`.

    Raises UnknownAdapter when its peft files are missing, and AdapterRefused (one-line reason)
    for anything this base model cannot serve: wrong base (manifest `base_model_hash` differs
    from `base_model_hash`), files whose hash differs from the manifest's, links out of the
    store, unsupported peft options, config values out of bounds, unknown target modules,
    shapes that do not fit the base, ranks above `max_rank`, non-finite values.
    """
    directory = AdapterDir(Path(adapter_dir))
    adapter_id = adapter_id or directory.adapter_id
    files = directory.read_files()
    version = files.adapter_hash
    _check_manifest(directory, files, adapter_id, base_model_hash)
    peft_config = _read_config(files.config, adapter_id)
    _check_peft_options(peft_config, adapter_id)

    pairs: dict[tuple[int, str], dict[str, Tensor]] = {}
    for key, tensor in _read_tensors(files, adapter_id):
        match = _KEY.match(key)
        if match is None:
            raise AdapterRefused(f"adapter {adapter_id!r} has weights for an unknown module: {key}")
        target, layer = match["target"], int(match["layer"])
        if target not in target_modules or PROJECTION_PARENT.get(target) != match["parent"]:
            raise AdapterRefused(
                f"adapter {adapter_id!r} targets {match['parent']}.{target}, which this server "
                f"does not adapt (supported: {', '.join(target_modules)})"
            )
        if layer >= model_config.num_layers:
            raise AdapterRefused(
                f"adapter {adapter_id!r} adapts layer {layer} but the base model has "
                f"{model_config.num_layers} layers: it was trained for another base model"
            )
        pairs.setdefault((layer, target), {})[match["ab"]] = tensor
    if not pairs:
        raise AdapterRefused(f"adapter {adapter_id!r} holds no LoRA weights")

    modules: dict[tuple[int, str], LoraModule] = {}
    for (layer, target), ab in sorted(pairs.items()):
        name = f"layers.{layer}.{PROJECTION_PARENT[target]}.{target}"
        if set(ab) != {"A", "B"}:
            raise AdapterRefused(
                f"adapter {adapter_id!r} has lora_A without lora_B (or the reverse) for {name}"
            )
        a, b = ab["A"], ab["B"]
        in_features, out_features = model_config.projection_shape(target)
        rank = a.shape[0] if a.dim() == 2 else -1
        if a.shape != (rank, in_features) or b.shape != (out_features, rank):
            raise AdapterRefused(
                f"adapter {adapter_id!r} has shapes A{tuple(a.shape)} B{tuple(b.shape)} for "
                f"{name}, the base model needs A[r, {in_features}] B[{out_features}, r]: it was "
                "trained for another base model"
            )
        if rank < 1 or rank > max_rank:
            raise AdapterRefused(
                f"adapter {adapter_id!r} has rank {rank} on {name}, above the maximum {max_rank}"
            )
        expected_rank = _pattern_value(peft_config.get("rank_pattern"), name, peft_config.get("r"))
        if expected_rank is not None and expected_rank != rank:
            raise AdapterRefused(
                f"adapter {adapter_id!r} declares r={expected_rank} for {name} but its weights "
                f"have rank {rank}"
            )
        if not (a.is_floating_point() and b.is_floating_point()):
            raise AdapterRefused(f"adapter {adapter_id!r} has non-float weights in {name}")
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise AdapterRefused(f"adapter {adapter_id!r} has non-finite weights in {name}")
        alpha = _pattern_value(
            peft_config.get("alpha_pattern"),
            name,
            peft_config.get("lora_alpha", _PEFT_DEFAULT_ALPHA),
        )
        divisor = math.sqrt(rank) if peft_config.get("use_rslora") else rank
        modules[(layer, target)] = LoraModule(
            a=a.to(dtype).contiguous(), b=b.to(dtype).contiguous(), scale=float(alpha) / divisor
        )
    return AdapterWeights(adapter_id=adapter_id, version=version, modules=modules)


def save_peft_adapter(
    adapter_dir: Path,
    modules: dict[tuple[int, str], tuple[Tensor, Tensor]],
    *,
    lora_alpha: float,
    base_model_name_or_path: str = "",
) -> str:
    """Write an adapter in peft's on-disk format (as `save_pretrained` does); returns its
    version (the adapter hash).

    `modules` maps (layer, target) to (lora_A [r, in], lora_B [out, r]). All modules must share
    one rank. Used by tests and the benchmark to fill a store without training.
    """
    ranks = {a.shape[0] for a, _ in modules.values()}
    if len(ranks) != 1:
        raise ValueError(f"save_peft_adapter writes one rank per adapter, got {sorted(ranks)}")
    files = AdapterDir(Path(adapter_dir))
    files.path.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, Tensor] = {}
    for (layer, target), (a, b) in modules.items():
        prefix = f"base_model.model.model.layers.{layer}.{PROJECTION_PARENT[target]}.{target}"
        tensors[f"{prefix}.lora_A.weight"] = a.contiguous()
        tensors[f"{prefix}.lora_B.weight"] = b.contiguous()
    save_file(tensors, str(files.weights_path), metadata={"format": "pt"})
    targets = sorted({target for _, target in modules})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": ranks.pop(),
        "lora_alpha": lora_alpha,
        "lora_dropout": 0.0,
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    files.config_path.write_text(json.dumps(config, indent=2, sort_keys=True))
    return files.adapter_hash()


def _check_manifest(
    directory: AdapterDir, files: AdapterFiles, adapter_id: str, base_model_hash: str | None
) -> None:
    manifest = directory.read_manifest()
    if manifest is None:
        return
    check_integrity(adapter_id, files, manifest)
    if base_model_hash is not None and manifest.base_model_hash != base_model_hash:
        raise AdapterRefused(
            f"adapter {adapter_id!r} was trained on base model {manifest.base_model_hash[:12]}..."
            f", this server runs {base_model_hash[:12]}..."
        )


def _check_peft_options(config: dict[str, Any], adapter_id: str) -> None:
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise AdapterRefused(
            f"adapter {adapter_id!r} is a {str(peft_type)[:40]} adapter; only LORA is served"
        )
    if config.get("use_dora"):
        raise AdapterRefused(f"adapter {adapter_id!r} uses DoRA, which this server does not serve")
    if config.get("fan_in_fan_out"):
        raise AdapterRefused(f"adapter {adapter_id!r} sets fan_in_fan_out, meant for other bases")
    if config.get("bias", "none") != "none":
        raise AdapterRefused(
            f"adapter {adapter_id!r} trains biases (bias={str(config['bias'])[:40]!r}); only "
            "bias='none' is served"
        )
    if config.get("modules_to_save"):
        raise AdapterRefused(
            f"adapter {adapter_id!r} saves full modules {str(config['modules_to_save'])[:80]}; "
            "only LoRA weights are served"
        )
    if not isinstance(config.get("use_rslora", False), bool):
        raise AdapterRefused(f"adapter {adapter_id!r}: use_rslora must be true or false")
    if "r" in config:
        _check_rank(config["r"], "r", adapter_id)
    _check_alpha(config.get("lora_alpha", _PEFT_DEFAULT_ALPHA), "lora_alpha", adapter_id)
    for field in ("rank_pattern", "alpha_pattern"):
        patterns = config.get(field)
        if patterns is None:
            continue
        if not isinstance(patterns, dict):
            raise AdapterRefused(f"adapter {adapter_id!r}: {field} must be a JSON object")
        if len(patterns) > MAX_PATTERN_KEYS:
            raise AdapterRefused(
                f"adapter {adapter_id!r}: {field} has {len(patterns)} keys, more than "
                f"{MAX_PATTERN_KEYS}"
            )
        for key, value in patterns.items():
            _check_pattern_key(key, field, adapter_id)
            if field == "rank_pattern":
                _check_rank(value, f"{field}[{key!r}]", adapter_id)
            else:
                _check_alpha(value, f"{field}[{key!r}]", adapter_id)


def _check_rank(value: Any, what: str, adapter_id: str) -> None:
    # The upper bound is the weights' check: a declared rank must equal the weights' rank,
    # which may not exceed the server's maximum.
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise AdapterRefused(
            f"adapter {adapter_id!r}: {what} must be an integer >= 1, not {str(value)[:40]}"
        )


def _check_alpha(value: Any, what: str, adapter_id: str) -> None:
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if not number or not math.isfinite(value) or not 0 < value <= MAX_LORA_ALPHA:
        raise AdapterRefused(
            f"adapter {adapter_id!r}: {what} must be a finite number in (0, {MAX_LORA_ALPHA:g}], "
            f"not {str(value)[:40]}"
        )


def _check_pattern_key(key: str, field: str, adapter_id: str) -> None:
    if len(key) > MAX_PATTERN_KEY_CHARS or not _PATTERN_KEY.fullmatch(key):
        raise AdapterRefused(
            f"adapter {adapter_id!r}: {field} key {key[:60]!r} is not a module-name suffix "
            f"(letters, digits, '_' and '.', at most {MAX_PATTERN_KEY_CHARS} characters); "
            "pattern keys are matched literally, regular expressions are not served"
        )


def _pattern_value(patterns: dict[str, Any] | None, module_name: str, default: Any) -> Any:
    """peft's rank_pattern/alpha_pattern lookup, literally: the first key that is the module
    name (`model.layers.0.self_attn.q_proj`) or a dotted suffix of it wins. Keys were checked
    by `_check_pattern_key`."""
    name = f"model.{module_name}"
    for key, value in (patterns or {}).items():
        if name == key or name.endswith(f".{key}"):
            return value
    return default


def _read_config(data: bytes, adapter_id: str) -> dict[str, Any]:
    try:
        config = json.loads(data)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        # ValueError covers JSON syntax and integers too long to convert.
        reason = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise AdapterRefused(
            f"adapter {adapter_id!r}: cannot read {AdapterDir.CONFIG_FILE}: {reason}"
        ) from None
    if not isinstance(config, dict):
        raise AdapterRefused(
            f"adapter {adapter_id!r}: {AdapterDir.CONFIG_FILE} is not a JSON object"
        )
    return config


def _read_tensors(files: AdapterFiles, adapter_id: str) -> list[tuple[str, Tensor]]:
    try:
        return list(load_safetensors(files.weights).items())
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise AdapterRefused(
            f"adapter {adapter_id!r}: {AdapterDir.WEIGHTS_FILE} is unreadable: {reason}"
        ) from None
