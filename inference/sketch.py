"""Gradient sketches: the projected gradient of a (prompt, completion) pair's loss with respect
to an adapter's LoRA parameters. The attribution index is built with these functions at
training time, and the worker and the verifier call them on generated text, so both sides of
the TRAK score come from exactly the same computation.

Loss: the mean token negative log-likelihood over the completion tokens only, teacher-forced,
on the sequence prompt + completion: the prompt encoded as the checkpoint encodes it (its
special tokens, such as a BOS, included; a conversation through its chat template), the
completion tokenized on its own without special tokens. A training row is the pair ("", text).

Per-example gradients come from one batched forward and backward: for a linear map y = x W^T
the gradient of example b's loss is sum_t g[b,t] x[b,t]^T, with x the layer's input and g the
gradient at its output, both captured by hooks on the LoRA A and B layers. Padding sits at the
right and is masked from the loss, so no example's gradient sees another's tokens.

Projections, named in the index (`index.json` "projection") and on every sketch:
- "factored-countsketch-v1" (`PROJECTION_KIND`, what new indexes use): see
  `inference.factored_projection`; the worker computes it for a whole mixed-adapter batch in
  one pass (`inference.batched_sketch`).
- "gaussian-blocked-v1" (`GAUSSIAN_KIND`, indexes built before it): the flattened gradient of
  each LoRA parameter, in sorted name order, is multiplied by a Gaussian matrix with entries
  N(0, 1/k). The matrix of a parameter is generated in blocks of at most `BLOCK_ROWS` rows,
  each from its own generator seeded by sha256(seed, parameter name, block), always on the CPU:
  memory stays bounded, and any device gets the same numbers.
`Sketcher` computes either, one adapter at a time: it is what `verify` recomputes with.

Switching adapters: adapters whose LoRA config matches the loaded one (rank, alpha, target
modules, and so the same parameter names and shapes) are swapped by copying their weights into
the loaded PeftModel's parameters; a small LRU keeps recently used adapters' weights in memory,
so switching back costs one copy. Only a different config rebuilds the PeftModel.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import PeftModel
from safetensors.torch import load
from torch import nn
from transformers import PreTrainedTokenizerBase

from inference.adapter_store import AdapterDir
from inference.attribution_index import meta_path, read_index_meta
from inference.factored_projection import FACTORED_KIND, FactoredProjector
from inference.tokenizer import Prompt, added_prefix_length, encode_prompts

GAUSSIAN_KIND = "gaussian-blocked-v1"
PROJECTION_KIND = FACTORED_KIND
PROJECTION_KINDS = (GAUSSIAN_KIND, FACTORED_KIND)
LOSS_DEFINITION = "mean-nll-completion-tokens-teacher-forced"
DEFAULT_K = 512
DEFAULT_MAX_LENGTH = 64
BLOCK_ROWS = 8192
IGNORE = -100
# Keep the whole projection in memory when it fits in this many bytes (it does for small
# models); above it, blocks are regenerated for every batch.
PROJECTION_CACHE_BYTES = 512 << 20
# Adapters whose weights a Sketcher keeps in memory for cheap switches back, and projectors
# (each may hold a cached projection of up to PROJECTION_CACHE_BYTES).
DEFAULT_CACHED_ADAPTERS = 16
CACHED_PROJECTORS = 4
# adapter_config.json fields that do not change the model the config builds.
_CONFIG_FIELDS_IGNORED = frozenset({"base_model_name_or_path", "revision", "inference_mode"})


@dataclass(frozen=True)
class EncodedPair:
    input_ids: list[int]
    labels: list[int]  # IGNORE on the prompt's tokens (its special tokens included)


def encode_pair(
    tokenizer: PreTrainedTokenizerBase, prompt: Prompt, completion: str, max_length: int
) -> EncodedPair:
    """The prompt as the checkpoint encodes it, then the completion, at most `max_length`
    tokens: the special tokens the tokenizer puts before a text stay, the completion keeps its
    first tokens, then the prompt keeps its last ones."""
    return encode_pairs(tokenizer, [(prompt, completion)], max_length)[0]


def encode_pairs(
    tokenizer: PreTrainedTokenizerBase, pairs: Sequence[tuple[Prompt, str]], max_length: int
) -> list[EncodedPair]:
    """`encode_pair` of each pair, with the prompts and the completions each tokenized in one
    call."""
    lead = added_prefix_length(tokenizer)
    if max_length - lead < 1:
        raise ValueError(f"max_length {max_length} leaves no room for a completion token")
    completions = _token_ids(tokenizer, [completion for _, completion in pairs])
    prompts = encode_prompts(tokenizer, [prompt for prompt, _ in pairs])
    encoded = []
    for (prompt, _), prompt_ids, completion_ids in zip(pairs, prompts, completions, strict=True):
        if not completion_ids:
            raise ValueError("the completion is empty: there is no token to compute a loss on")
        # A rendered conversation begins with the template's own text, not added tokens.
        pinned = prompt_ids[:lead] if isinstance(prompt, str) else []
        rest = prompt_ids[len(pinned) :]
        room = max_length - len(pinned)
        completion_ids = completion_ids[:room]
        keep = room - len(completion_ids)
        rest = rest[len(rest) - keep :] if keep else []
        ids = pinned + rest + completion_ids
        labels = [IGNORE] * (len(pinned) + len(rest)) + completion_ids
        encoded.append(EncodedPair(ids, labels))
    return encoded


def _token_ids(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text without special tokens; an empty text has none."""
    nonempty = [text for text in texts if text]
    ids = iter(tokenizer(nonempty, add_special_tokens=False)["input_ids"] if nonempty else [])
    return [list(next(ids)) if text else [] for text in texts]


def collate(
    pairs: Sequence[EncodedPair], pad_id: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded input ids [B, T], attention mask [B, T] and labels [B, T]."""
    length = max(len(p.input_ids) for p in pairs)
    ids = torch.tensor([p.input_ids + [pad_id] * (length - len(p.input_ids)) for p in pairs])
    labels = torch.tensor([p.labels + [IGNORE] * (length - len(p.labels)) for p in pairs])
    lengths = torch.tensor([len(p.input_ids) for p in pairs])
    mask = (torch.arange(length) < lengths[:, None]).long()
    return ids.to(device), mask.to(device), labels.to(device)


def per_example_loss(
    model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """[B]: each example's mean NLL over its labelled tokens (next-token prediction)."""
    # No KV cache: nothing reads it, and building it costs time on every batch.
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
    targets = labels[:, 1:]
    nll = nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        ignore_index=IGNORE,
        reduction="none",
    ).view(targets.shape)
    counts = (targets != IGNORE).sum(dim=1).clamp(min=1)
    return nll.sum(dim=1) / counts


def canonical_name(name: str, adapter_name: str = "default") -> str:
    """A LoRA parameter's name as it is stored in adapter_model.safetensors."""
    return name.replace(f".{adapter_name}.", ".")


def lora_layers(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """(canonical weight name, layer) of every LoRA A and B linear layer, sorted by name."""
    found = []
    for name, module in model.named_modules():
        parts = name.split(".")
        is_lora = len(parts) >= 2 and parts[-2] in ("lora_A", "lora_B")
        if is_lora and isinstance(module, nn.Linear) and module.weight.requires_grad:
            found.append((canonical_name(f"{name}.weight", parts[-1]), module))
    if not found:
        raise ValueError("the model has no trainable LoRA layers")
    return sorted(found, key=lambda item: item[0])


def param_layout(model: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [(name, tuple(layer.weight.shape)) for name, layer in lora_layers(model)]


def layout_hash(layout: Sequence[tuple[str, tuple[int, ...]]]) -> str:
    text = json.dumps([[name, list(shape)] for name, shape in layout])
    return hashlib.sha256(text.encode()).hexdigest()


def _block_seed(seed: int, name: str, block: int) -> int:
    digest = hashlib.sha256(f"{GAUSSIAN_KIND}:{seed}:{name}:{block}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class Projector:
    """The seeded blocked Gaussian projection of LoRA gradients to k dimensions."""

    kind = GAUSSIAN_KIND

    def __init__(
        self,
        layout: Sequence[tuple[str, tuple[int, ...]]],
        k: int = DEFAULT_K,
        seed: int = 0,
        device: torch.device | str = "cpu",
        cache_bytes: int = PROJECTION_CACHE_BYTES,
    ) -> None:
        if k < 1:
            raise ValueError(f"k must be positive, got {k}")
        self.layout = list(layout)
        self.k = k
        self.seed = seed
        self.device = torch.device(device)
        total = sum(math.prod(shape) for _, shape in self.layout) * k * 4
        self._cache: dict[str, list[torch.Tensor]] | None = {} if total <= cache_bytes else None

    def _blocks(self, name: str, numel: int) -> Iterator[tuple[int, torch.Tensor]]:
        if self._cache is not None and name in self._cache:
            yield from enumerate(self._cache[name])
            return
        blocks = []
        for block, start in enumerate(range(0, numel, BLOCK_ROWS)):
            rows = min(BLOCK_ROWS, numel - start)
            generator = torch.Generator().manual_seed(_block_seed(self.seed, name, block))
            matrix = torch.randn(rows, self.k, generator=generator) / math.sqrt(self.k)
            matrix = matrix.to(self.device)
            if self._cache is not None:
                blocks.append(matrix)
            yield block, matrix
        if self._cache is not None:
            self._cache[name] = blocks

    def project_parameter(self, name: str, grads: torch.Tensor) -> torch.Tensor:
        """grads [B, *shape] of parameter `name` -> [B, k] float32."""
        flat = grads.reshape(grads.shape[0], -1).float()
        out = torch.zeros(flat.shape[0], self.k, device=flat.device)
        for block, matrix in self._blocks(name, flat.shape[1]):
            out += flat[:, block * BLOCK_ROWS : block * BLOCK_ROWS + matrix.shape[0]] @ matrix
        return out

    def project(self, grads: dict[str, torch.Tensor]) -> torch.Tensor:
        """grads: canonical name -> [B, *shape] per-example gradients; returns [B, k] float32."""
        out: torch.Tensor | None = None
        for name, shape in self.layout:
            values = math.prod(grads[name].shape[1:])
            if values != math.prod(shape):
                raise ValueError(f"gradient of {name} has {values} values, expected {shape}")
            part = self.project_parameter(name, grads[name])
            out = part if out is None else out + part
        assert out is not None
        return out


AnyProjector = Projector | FactoredProjector


def make_projector(
    kind: str,
    layout: Sequence[tuple[str, tuple[int, ...]]],
    k: int,
    seed: int,
    device: torch.device | str = "cpu",
) -> AnyProjector:
    """The projector an index of projection `kind` was built with."""
    if kind == GAUSSIAN_KIND:
        return Projector(layout, k, seed, device)
    if kind == FACTORED_KIND:
        return FactoredProjector(layout, k, seed, device)
    raise ValueError(f"unknown projection {kind!r}; known: {', '.join(PROJECTION_KINDS)}")


@contextmanager
def _capture(layers: Sequence[tuple[str, nn.Linear]]) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Record each LoRA layer's input and output on every forward call."""
    captured: dict[str, list[torch.Tensor]] = {name: [] for name, _ in layers}
    handles = []

    def forward_hook(name: str):
        def hook(
            _module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor
        ) -> None:
            captured[name] += [inputs[0].detach(), output]

        return hook

    for name, layer in layers:
        handles.append(layer.register_forward_hook(forward_hook(name)))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def per_example_gradients(
    model: nn.Module,
    ids: torch.Tensor,
    mask: torch.Tensor,
    labels: torch.Tensor,
    layers: Sequence[tuple[str, nn.Linear]] | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Exact per-example gradients of `per_example_loss` w.r.t. each LoRA weight: name ->
    [B, out, in]; and the losses [B]. `layers`: `lora_layers(model)`, when the caller has it."""
    layers = lora_layers(model) if layers is None else layers
    with _capture(layers) as captured:
        losses = per_example_loss(model, ids, mask, labels)
    for name, _ in layers:
        if len(captured[name]) != 2:
            raise RuntimeError(f"LoRA layer {name} ran {len(captured[name]) // 2} forward passes")
    # Differentiating w.r.t. the layers' outputs, not their weights, skips the summed weight
    # gradients, which nothing uses; the gradient at each output is the same either way.
    outputs = [captured[name][1] for name, _ in layers]
    output_grads = torch.autograd.grad(losses.sum(), outputs)
    grads = {}
    for (name, _), g in zip(layers, output_grads, strict=True):
        x = captured[name][0]
        grads[name] = torch.einsum("bto,bti->boi", g.float(), x.float())
    return grads, losses.detach()


def projected_gradient(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[tuple[Prompt, str]],
    projector: AnyProjector,
    max_length: int = DEFAULT_MAX_LENGTH,
    batch_size: int = 16,
    layers: Sequence[tuple[str, nn.Linear]] | None = None,
) -> np.ndarray:
    """[len(pairs), k] float32: projected gradients of each pair's completion loss.
    `layers`: `lora_layers(model)`, when the caller has it.

    Deterministic on the CPU for a given batch composition; a pair's sketch in another batch
    agrees up to float rounding."""
    if not pairs:
        return np.zeros((0, projector.k), dtype=np.float32)
    device = next(model.parameters()).device
    layers = lora_layers(model) if layers is None else layers
    encoded = encode_pairs(tokenizer, pairs, max_length)
    out = []
    # Toggling train/eval walks every module (slow for a small model): only when needed.
    modes = [(module, module.training) for module in model.modules() if module.training]
    if modes:
        model.eval()
    try:
        for start in range(0, len(encoded), batch_size):
            ids, mask, labels = collate(
                encoded[start : start + batch_size], pad_id(tokenizer), device
            )
            grads, _ = per_example_gradients(model, ids, mask, labels, layers)
            out.append(projector.project(grads).cpu())
    finally:
        for module, training in modes:
            module.training = training
    return torch.cat(out).numpy().astype(np.float32, copy=False)


def files_version(adapter_dir: Path) -> tuple[int, ...]:
    """(mtime, size) of the weights, the config and the index metadata: changes when any of
    them is rewritten."""
    files = AdapterDir(adapter_dir)
    paths = (files.weights_path, files.config_path, meta_path(files.index_dir))
    version: list[int] = []
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"{path.name} missing in {path.parent}")
        stat = path.stat()
        version += [stat.st_mtime_ns, stat.st_size]
    return tuple(version)


def pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token")
    return int(pad)


def check_index_method(adapter_dir: Path, meta: dict[str, Any], kinds: Sequence[str]) -> None:
    """Refuse an index whose projection is not one of `kinds` or whose loss is not ours."""
    if meta.get("projection") not in kinds or meta.get("loss") != LOSS_DEFINITION:
        raise ValueError(
            f"index of {adapter_dir} uses projection {meta.get('projection')!r} and loss "
            f"{meta.get('loss')!r}; this code computes {' or '.join(map(repr, kinds))} and "
            f"{LOSS_DEFINITION!r}"
        )


@dataclass(frozen=True)
class _AdapterFiles:
    """What a Sketcher read from one adapter directory, valid while its files are unchanged."""

    version: tuple[int, ...]  # files_version when read
    config: dict[str, Any]  # adapter_config.json, less _CONFIG_FIELDS_IGNORED
    weights: dict[str, torch.Tensor]  # canonical name -> tensor on the sketcher's device
    meta: dict[str, Any]  # the attribution index's metadata


def _read_adapter(
    adapter_dir: Path, version: tuple[int, ...], device: torch.device
) -> _AdapterFiles:
    files = AdapterDir(adapter_dir)
    meta = read_index_meta(files.index_dir)
    check_index_method(adapter_dir, meta, PROJECTION_KINDS)
    config = json.loads(files.config_path.read_text())
    if not isinstance(config, dict):
        raise ValueError(f"{files.config_path.name} in {adapter_dir} is not a JSON object")
    config = {key: value for key, value in config.items() if key not in _CONFIG_FIELDS_IGNORED}
    # Read into memory, not mapped: a cached tensor mapped from the file would change under
    # us (or fault) when the file is rewritten in place.
    weights = load(files.weights_path.read_bytes())
    weights = {name: tensor.to(device) for name, tensor in weights.items()}
    return _AdapterFiles(version, config, weights, meta)


class Sketcher:
    """Keeps the base model loaded and computes sketches for one adapter at a time, with the
    k, seed and max length recorded in the adapter's attribution index."""

    def __init__(
        self,
        base_model_dir: Path,
        adapter_dir: Path | None = None,
        device: str | torch.device = "cpu",
        batch_size: int = 16,
        cached_adapters: int = DEFAULT_CACHED_ADAPTERS,
    ) -> None:
        from inference.base_model import load_base_model

        if cached_adapters < 0:
            raise ValueError(f"cached_adapters must be >= 0, got {cached_adapters}")
        self._base, self.tokenizer = load_base_model(base_model_dir, device)
        for param in self._base.parameters():
            param.requires_grad_(False)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self._cached_adapters = cached_adapters
        self._adapters: OrderedDict[Path, _AdapterFiles] = OrderedDict()
        self._projectors: OrderedDict[tuple[str, str, int, int], AnyProjector] = OrderedDict()
        # The PeftModel, with what it was built from and what it holds.
        self._model: PeftModel | None = None
        self._model_config: dict[str, Any] | None = None
        self._params: dict[str, nn.Parameter] = {}  # canonical name -> adapter parameter
        self._layers: list[tuple[str, nn.Linear]] = []
        self._layout_hash = ""
        self.adapter_dir: Path | None = None  # the adapter sketches are computed for
        self._version: tuple[int, ...] | None = None
        if adapter_dir is not None:
            self.use_adapter(adapter_dir)

    def use_adapter(self, adapter_dir: Path) -> None:
        """Swap in an adapter (safetensors weights). Calling it again with the same adapter is
        free unless its files changed on disk. After a refused switch no adapter is in use."""
        adapter_dir = Path(adapter_dir)
        version = files_version(adapter_dir)
        if self.adapter_dir == adapter_dir and self._version == version:
            return
        self.adapter_dir = None
        self._version = None
        files = self._adapter_files(adapter_dir, version)
        if self._fits_loaded_model(files):
            with torch.no_grad():
                for name, param in self._params.items():
                    param.copy_(files.weights[name])
        else:
            self._build_model(adapter_dir, files)
        if self._layout_hash != files.meta["param_layout_hash"]:
            raise ValueError(
                f"adapter in {adapter_dir} does not match its index's parameter layout"
            )
        meta = files.meta
        self.k, self.seed, self.max_length = meta["k"], meta["seed"], meta["max_length"]
        self._projector = self._projector_for(meta["projection"], self.k, self.seed)
        self.adapter_dir = adapter_dir
        self._version = version

    def _adapter_files(self, adapter_dir: Path, version: tuple[int, ...]) -> _AdapterFiles:
        """The adapter's files from the LRU, or read again when absent or changed on disk."""
        files = self._adapters.pop(adapter_dir, None)
        if files is None or files.version != version:
            files = _read_adapter(adapter_dir, version, self.device)
        if self._cached_adapters:
            self._adapters[adapter_dir] = files
            while len(self._adapters) > self._cached_adapters:
                self._adapters.popitem(last=False)
        return files

    def _fits_loaded_model(self, files: _AdapterFiles) -> bool:
        """Whether the loaded PeftModel takes these weights as they are: same config, and the
        weights name exactly its adapter parameters, with the same shapes."""
        if self._model is None or files.config != self._model_config:
            return False
        if files.weights.keys() != self._params.keys():
            return False
        return all(files.weights[name].shape == param.shape for name, param in self._params.items())

    def _build_model(self, adapter_dir: Path, files: _AdapterFiles) -> None:
        if self._model is not None:
            self._base = self._model.unload()
            self._model = None
            self._model_config = None
        model = PeftModel.from_pretrained(
            self._base, str(adapter_dir), is_trainable=True, use_safetensors=True
        )
        model.to(self.device)
        model.eval()
        try:
            layers = lora_layers(model)
        except ValueError:
            self._base = model.unload()
            raise
        # Set together, once the model is complete, so a failed build leaves no stale state.
        self._layers = layers
        self._layout_hash = layout_hash(
            [(name, tuple(layer.weight.shape)) for name, layer in layers]
        )
        self._params = {
            canonical_name(name): param
            for name, param in model.named_parameters()
            if param.requires_grad
        }
        self._model_config = files.config
        self._model = model

    def _projector_for(self, kind: str, k: int, seed: int) -> AnyProjector:
        key = (kind, self._layout_hash, k, seed)
        projector = self._projectors.pop(key, None)
        if projector is None:
            layout = [(name, tuple(layer.weight.shape)) for name, layer in self._layers]
            projector = make_projector(kind, layout, k, seed, self.device)
        self._projectors[key] = projector
        while len(self._projectors) > CACHED_PROJECTORS:
            self._projectors.popitem(last=False)
        return projector

    @property
    def projection(self) -> str:
        """The projection of the adapter in use."""
        return self._projector.kind

    def projected_gradient(self, pairs: Sequence[tuple[Prompt, str]]) -> np.ndarray:
        if self._model is None or self.adapter_dir is None:
            raise RuntimeError("no adapter loaded: call use_adapter(adapter_dir) first")
        return projected_gradient(
            self._model,
            self.tokenizer,
            pairs,
            self._projector,
            self.max_length,
            self.batch_size,
            self._layers,
        )
