"""Gradient sketches: the projected gradient of a (prompt, completion) pair's loss with respect
to an adapter's LoRA parameters. The attribution index is built with these functions at
training time, and the worker and the verifier call them on generated text, so both sides of
the TRAK score come from exactly the same computation.

Loss: the mean token negative log-likelihood over the completion tokens only, teacher-forced,
on the sequence bos + prompt + completion (each part tokenized on its own; a training row is
the pair ("", text)).

Per-example gradients come from one batched forward and backward: for a linear map y = x W^T
the gradient of example b's loss is sum_t g[b,t] x[b,t]^T, with x the layer's input and g the
gradient at its output, both captured by hooks on the LoRA A and B layers. Padding sits at the
right and is masked from the loss, so no example's gradient sees another's tokens.

Projection ("gaussian-blocked-v1"): the flattened gradient of each LoRA parameter, in sorted
name order, is multiplied by a Gaussian matrix with entries N(0, 1/k). The matrix of a
parameter is generated in blocks of at most `BLOCK_ROWS` rows, each from its own generator
seeded by sha256(seed, parameter name, block), always on the CPU: memory stays bounded, and any
device gets the same numbers.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from peft import PeftModel
from torch import nn
from transformers import PreTrainedTokenizerBase

from inference.attribution_index import read_index_meta

PROJECTION_KIND = "gaussian-blocked-v1"
LOSS_DEFINITION = "mean-nll-completion-tokens-teacher-forced"
DEFAULT_K = 512
DEFAULT_MAX_LENGTH = 64
BLOCK_ROWS = 8192
IGNORE = -100
# Keep the whole projection in memory when it fits in this many bytes (it does for small
# models); above it, blocks are regenerated for every batch.
PROJECTION_CACHE_BYTES = 512 << 20


@dataclass(frozen=True)
class EncodedPair:
    input_ids: list[int]
    labels: list[int]  # IGNORE on bos and prompt tokens


def encode_pair(
    tokenizer: PreTrainedTokenizerBase, prompt: str, completion: str, max_length: int
) -> EncodedPair:
    """bos + prompt + completion, at most `max_length` tokens: the completion keeps its first
    tokens, then the prompt keeps its last ones."""
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    if not completion_ids:
        raise ValueError("the completion is empty: there is no token to compute a loss on")
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    room = max_length - len(bos)
    if room < 1:
        raise ValueError(f"max_length {max_length} leaves no room for a completion token")
    completion_ids = completion_ids[:room]
    keep = room - len(completion_ids)
    prompt_ids = prompt_ids[len(prompt_ids) - keep :] if keep else []
    ids = bos + prompt_ids + completion_ids
    labels = [IGNORE] * (len(bos) + len(prompt_ids)) + completion_ids
    return EncodedPair(ids, labels)


def collate(
    pairs: Sequence[EncodedPair], pad_id: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded input ids [B, T], attention mask [B, T] and labels [B, T]."""
    length = max(len(p.input_ids) for p in pairs)
    ids = torch.full((len(pairs), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(pairs), length), dtype=torch.long)
    labels = torch.full((len(pairs), length), IGNORE, dtype=torch.long)
    for row, pair in enumerate(pairs):
        n = len(pair.input_ids)
        ids[row, :n] = torch.tensor(pair.input_ids)
        mask[row, :n] = 1
        labels[row, :n] = torch.tensor(pair.labels)
    return ids.to(device), mask.to(device), labels.to(device)


def per_example_loss(
    model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """[B]: each example's mean NLL over its labelled tokens (next-token prediction)."""
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
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
    digest = hashlib.sha256(f"{PROJECTION_KIND}:{seed}:{name}:{block}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class Projector:
    """The seeded random projection of LoRA gradients to k dimensions."""

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

    def project(self, grads: dict[str, torch.Tensor]) -> torch.Tensor:
        """grads: canonical name -> [B, *shape] per-example gradients; returns [B, k] float32."""
        out: torch.Tensor | None = None
        for name, shape in self.layout:
            flat = grads[name].reshape(grads[name].shape[0], -1).float()
            if flat.shape[1] != math.prod(shape):
                raise ValueError(f"gradient of {name} has {flat.shape[1]} values, expected {shape}")
            for block, matrix in self._blocks(name, flat.shape[1]):
                part = flat[:, block * BLOCK_ROWS : block * BLOCK_ROWS + matrix.shape[0]] @ matrix
                out = part if out is None else out + part
        assert out is not None
        return out


@contextmanager
def _capture(layers: Sequence[tuple[str, nn.Linear]]) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Record each LoRA layer's input and, during backward, the gradient at its output."""
    captured: dict[str, list[torch.Tensor]] = {name: [] for name, _ in layers}
    handles = []

    def forward_hook(name: str):
        def hook(
            _module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor
        ) -> None:
            captured[name] = [inputs[0].detach()]
            output.register_hook(lambda grad: captured[name].append(grad.detach()))

        return hook

    for name, layer in layers:
        handles.append(layer.register_forward_hook(forward_hook(name)))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def per_example_gradients(
    model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Exact per-example gradients of `per_example_loss` w.r.t. each LoRA weight: name ->
    [B, out, in]; and the losses [B]."""
    layers = lora_layers(model)
    params = [layer.weight for _, layer in layers]
    with _capture(layers) as captured:
        losses = per_example_loss(model, ids, mask, labels)
        torch.autograd.grad(losses.sum(), params)
    grads = {}
    for name, _ in layers:
        if len(captured[name]) != 2:
            raise RuntimeError(f"LoRA layer {name} ran {len(captured[name]) - 1} backward passes")
        x, g = captured[name]
        grads[name] = torch.einsum("bto,bti->boi", g.float(), x.float())
    return grads, losses.detach()


def projected_gradient(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[tuple[str, str]],
    projector: Projector,
    max_length: int = DEFAULT_MAX_LENGTH,
    batch_size: int = 16,
) -> np.ndarray:
    """[len(pairs), k] float32: projected gradients of each pair's completion loss.

    Deterministic on the CPU for a given batch composition; a pair's sketch in another batch
    agrees up to float rounding."""
    if not pairs:
        return np.zeros((0, projector.k), dtype=np.float32)
    device = next(model.parameters()).device
    encoded = [
        encode_pair(tokenizer, prompt, completion, max_length) for prompt, completion in pairs
    ]
    out = []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(encoded), batch_size):
            ids, mask, labels = collate(
                encoded[start : start + batch_size], _pad_id(tokenizer), device
            )
            grads, _ = per_example_gradients(model, ids, mask, labels)
            out.append(projector.project(grads).cpu())
    finally:
        model.train(was_training)
    return torch.cat(out).numpy().astype(np.float32, copy=False)


def _files_version(adapter_dir: Path) -> tuple[int, ...]:
    """(mtime, size) of the weights and the index metadata: changes when either is rewritten."""
    paths = (
        adapter_dir / "adapter_model.safetensors",
        adapter_dir / "attribution_index" / "index.json",
    )
    version: list[int] = []
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"{path.name} missing in {path.parent}")
        stat = path.stat()
        version += [stat.st_mtime_ns, stat.st_size]
    return tuple(version)


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token")
    return int(pad)


class Sketcher:
    """Keeps the base model loaded and computes sketches for one adapter at a time, with the
    k, seed and max length recorded in the adapter's attribution index."""

    def __init__(
        self,
        base_model_dir: Path,
        adapter_dir: Path | None = None,
        device: str | torch.device = "cpu",
        batch_size: int = 16,
    ) -> None:
        from inference.base_model import load_base_model

        self._base, self.tokenizer = load_base_model(base_model_dir, device)
        for param in self._base.parameters():
            param.requires_grad_(False)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self._model: PeftModel | None = None
        self._projectors: dict[tuple[str, int, int], Projector] = {}
        self.adapter_dir: Path | None = None
        self._version: tuple[int, ...] | None = None
        if adapter_dir is not None:
            self.use_adapter(adapter_dir)

    def use_adapter(self, adapter_dir: Path) -> None:
        """Swap in an adapter (safetensors weights). Calling it again with the same adapter is
        free unless its files changed on disk."""
        adapter_dir = Path(adapter_dir)
        version = _files_version(adapter_dir)
        if self.adapter_dir == adapter_dir and self._version == version:
            return
        if self._model is not None:
            self._base = self._model.unload()
            self._model = None
            self.adapter_dir = None
        meta = read_index_meta(adapter_dir / "attribution_index")
        if meta.get("projection") != PROJECTION_KIND or meta.get("loss") != LOSS_DEFINITION:
            raise ValueError(
                f"index of {adapter_dir} uses projection {meta.get('projection')!r} and loss "
                f"{meta.get('loss')!r}; this code computes {PROJECTION_KIND!r} and "
                f"{LOSS_DEFINITION!r}"
            )
        model = PeftModel.from_pretrained(
            self._base, str(adapter_dir), is_trainable=True, use_safetensors=True
        )
        layout = param_layout(model)
        if layout_hash(layout) != meta["param_layout_hash"]:
            self._base = model.unload()
            raise ValueError(
                f"adapter in {adapter_dir} does not match its index's parameter layout"
            )
        model.to(self.device)
        model.eval()
        self.k, self.seed, self.max_length = meta["k"], meta["seed"], meta["max_length"]
        key = (layout_hash(layout), self.k, self.seed)
        if key not in self._projectors:
            self._projectors[key] = Projector(layout, self.k, self.seed, self.device)
        self._projector = self._projectors[key]
        self._model = model
        self.adapter_dir = adapter_dir
        self._version = version

    @property
    def projection(self) -> str:
        return PROJECTION_KIND

    def projected_gradient(self, pairs: Sequence[tuple[str, str]]) -> np.ndarray:
        if self._model is None:
            raise RuntimeError("no adapter loaded: call use_adapter(adapter_dir) first")
        return projected_gradient(
            self._model, self.tokenizer, pairs, self._projector, self.max_length, self.batch_size
        )
