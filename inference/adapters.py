"""PEFT LoRA adapters: reading, validating and storing them on disk.

An adapter directory holds `adapter_config.json` and `adapter_model.safetensors` as written by
peft's `save_pretrained`, plus an optional `manifest.json` (written by the ModelFactory) whose
`base_model_hash` and `weights_hash` pin the base model and the weights. Anything that would
make the served model differ from what peft computes is refused with a one-line reason.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from inference.config import LORA_TARGETS, ModelConfig
from inference.hashing import adapter_weights_hash
from schemas.ids import is_valid_id

CONFIG_FILE = "adapter_config.json"
_PEFT_DEFAULT_ALPHA = 8  # peft's LoraConfig default when a config leaves lora_alpha out
WEIGHTS_FILE = "adapter_model.safetensors"
MANIFEST_FILE = "manifest.json"

_PARENT = {
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


class AdapterError(Exception):
    """Base of the adapter errors; `reason` is one line a user can act on."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class UnknownAdapter(AdapterError):
    """No adapter with this id in the store (or the id itself is invalid)."""


class AdapterRefused(AdapterError):
    """The adapter exists but cannot be served on this base model."""


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
    version: str  # sha256 of adapter_model.safetensors
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


def check_adapter_id(adapter_id: str) -> str:
    """Return the id if it is a valid adapter id, else raise UnknownAdapter with the reason."""
    if not isinstance(adapter_id, str) or not is_valid_id(adapter_id):
        raise UnknownAdapter(
            f"invalid adapter id {adapter_id!r}: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return adapter_id


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

    Raises AdapterRefused (one-line reason) for anything this base model cannot serve: wrong
    base (manifest `base_model_hash` differs from `base_model_hash`), weights whose sha256
    differs from the manifest's `weights_hash`, unsupported peft options, unknown target
    modules, shapes that do not fit the base, ranks above `max_rank`, non-finite values.
    """
    adapter_dir = Path(adapter_dir)
    adapter_id = adapter_id or adapter_dir.name
    config_path, weights_path = adapter_dir / CONFIG_FILE, adapter_dir / WEIGHTS_FILE
    if not config_path.is_file() or not weights_path.is_file():
        raise UnknownAdapter(
            f"adapter {adapter_id!r} needs {CONFIG_FILE} and {WEIGHTS_FILE} in its directory"
        )
    version = adapter_weights_hash(adapter_dir)
    _check_manifest(adapter_dir, adapter_id, version, base_model_hash)
    peft_config = _read_json(config_path, adapter_id)
    _check_peft_options(peft_config, adapter_id)

    pairs: dict[tuple[int, str], dict[str, Tensor]] = {}
    for key, tensor in _read_tensors(weights_path, adapter_id):
        match = _KEY.match(key)
        if match is None:
            raise AdapterRefused(f"adapter {adapter_id!r} has weights for an unknown module: {key}")
        target, layer = match["target"], int(match["layer"])
        if target not in target_modules or _PARENT.get(target) != match["parent"]:
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
        name = f"layers.{layer}.{_PARENT[target]}.{target}"
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
        if expected_rank is not None and int(expected_rank) != rank:
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
    manifest: dict[str, Any] | None = None,
) -> str:
    """Write an adapter in peft's on-disk format (as `save_pretrained` does); returns its version.

    `modules` maps (layer, target) to (lora_A [r, in], lora_B [out, r]). All modules must share
    one rank. Used by tests and the benchmark to fill a store without training.
    """
    ranks = {a.shape[0] for a, _ in modules.values()}
    if len(ranks) != 1:
        raise ValueError(f"save_peft_adapter writes one rank per adapter, got {sorted(ranks)}")
    adapter_dir = Path(adapter_dir)
    adapter_dir.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, Tensor] = {}
    for (layer, target), (a, b) in modules.items():
        prefix = f"base_model.model.model.layers.{layer}.{_PARENT[target]}.{target}"
        tensors[f"{prefix}.lora_A.weight"] = a.contiguous()
        tensors[f"{prefix}.lora_B.weight"] = b.contiguous()
    save_file(tensors, str(adapter_dir / WEIGHTS_FILE), metadata={"format": "pt"})
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
    (adapter_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
    version = adapter_weights_hash(adapter_dir)
    if manifest is not None:
        manifest = {**manifest, "weights_hash": version}
        (adapter_dir / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return version


class AdapterStore:
    """The disk tier: `root/<adapter_id>/` holds one adapter's PEFT files and manifest."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path_for(self, adapter_id: str) -> Path:
        """The adapter's directory; the id is validated so it names exactly one child of root."""
        check_adapter_id(adapter_id)
        return self.root / adapter_id

    def exists(self, adapter_id: str) -> bool:
        try:
            path = self.path_for(adapter_id)
        except UnknownAdapter:
            return False
        return (path / CONFIG_FILE).is_file() and (path / WEIGHTS_FILE).is_file()

    def ids(self) -> Iterator[str]:
        if not self.root.is_dir():
            return
        for child in sorted(self.root.iterdir()):
            if is_valid_id(child.name) and self.exists(child.name):
                yield child.name

    def load(
        self,
        adapter_id: str,
        model_config: ModelConfig,
        *,
        max_rank: int,
        target_modules: tuple[str, ...] = LORA_TARGETS,
        base_model_hash: str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> AdapterWeights:
        """Read one adapter from disk; UnknownAdapter when absent, AdapterRefused when invalid."""
        if not self.exists(adapter_id):
            raise UnknownAdapter(f"no adapter {adapter_id!r} in {self.root}")
        return load_peft_adapter(
            self.path_for(adapter_id),
            model_config,
            max_rank=max_rank,
            target_modules=target_modules,
            adapter_id=adapter_id,
            base_model_hash=base_model_hash,
            dtype=dtype,
        )


def _check_manifest(
    adapter_dir: Path, adapter_id: str, version: str, base_model_hash: str | None
) -> None:
    path = adapter_dir / MANIFEST_FILE
    if not path.is_file():
        return
    manifest = _read_json(path, adapter_id)
    declared_weights = manifest.get("weights_hash")
    if declared_weights is not None and declared_weights != version:
        raise AdapterRefused(
            f"adapter {adapter_id!r}: sha256 of {WEIGHTS_FILE} is {version[:12]}..., the manifest "
            f"says {str(declared_weights)[:12]}...: the weights were changed or corrupted"
        )
    declared_base = manifest.get("base_model_hash")
    if None not in (base_model_hash, declared_base) and declared_base != base_model_hash:
        raise AdapterRefused(
            f"adapter {adapter_id!r} was trained on base model {str(declared_base)[:12]}..., "
            f"this server runs {base_model_hash[:12]}..."
        )


def _check_peft_options(config: dict[str, Any], adapter_id: str) -> None:
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise AdapterRefused(
            f"adapter {adapter_id!r} is a {peft_type} adapter; only LORA is served"
        )
    if config.get("use_dora"):
        raise AdapterRefused(f"adapter {adapter_id!r} uses DoRA, which this server does not serve")
    if config.get("fan_in_fan_out"):
        raise AdapterRefused(f"adapter {adapter_id!r} sets fan_in_fan_out, meant for other bases")
    if config.get("bias", "none") != "none":
        raise AdapterRefused(
            f"adapter {adapter_id!r} trains biases (bias={config['bias']!r}); only bias='none' "
            "is served"
        )
    if config.get("modules_to_save"):
        raise AdapterRefused(
            f"adapter {adapter_id!r} saves full modules {config['modules_to_save']}; only LoRA "
            "weights are served"
        )
    if "r" in config and not isinstance(config["r"], int):
        raise AdapterRefused(f"adapter {adapter_id!r} has a non-integer r: {config['r']!r}")


def _pattern_value(patterns: dict[str, Any] | None, module_name: str, default: Any) -> Any:
    """peft's rank_pattern/alpha_pattern lookup: the first key that matches the end of the
    module name (`layers.0.self_attn.q_proj`, or a regex over it) wins."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", f"model.{module_name}"):
            return value
    return default


def _read_json(path: Path, adapter_id: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterRefused(f"adapter {adapter_id!r}: cannot read {path.name}: {exc}") from exc
    if not isinstance(data, dict):
        raise AdapterRefused(f"adapter {adapter_id!r}: {path.name} is not a JSON object")
    return data


def _read_tensors(path: Path, adapter_id: str) -> Iterator[tuple[str, Tensor]]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            keys = list(handle.keys())
            tensors = [(key, handle.get_tensor(key)) for key in keys]
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise AdapterRefused(
            f"adapter {adapter_id!r}: {WEIGHTS_FILE} is unreadable: {exc}"
        ) from exc
    yield from tensors
