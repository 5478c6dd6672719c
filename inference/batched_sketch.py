"""Sketches of a whole mixed-adapter batch in one forward and one backward pass.

Every adaptable projection of the base model is wrapped in a `MultiLoraLinear` that adds, for
each example of the batch, the LoRA delta of that example's own adapter: y = x W^T +
scale_b * (x A_b^T) B_b^T, with A_b and B_b gathered per example (zero for an adapter that
leaves the projection alone). The wrappers keep each delta's input x, its rank-space
activation h = x A^T and its output o = h B^T; one backward of the summed per-example losses
gives the gradients at h and o (the same as peft's lora_A and lora_B outputs), and it stops at
the first LoRA layer, since nothing before it needs a gradient. Each adapter's index projection
(`inference.factored_projection`) then sketches its LoRA matrices from these factors: A from
(x, dL/dh), B from (h, dL/do). No per-example gradient is ever formed.

The loss, its encoding and the projection are `inference.sketch`'s, so a sketch from here
agrees, up to float rounding, with `Sketcher`'s for one adapter at a time, and with the
training-time index built from full per-example gradients.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from inference.adapters import PROJECTION_PARENT, AdapterWeights, LoraModule, load_peft_adapter
from inference.attribution_index import read_index_meta
from inference.config import LORA_TARGETS, ModelConfig
from inference.factored_projection import FACTORED_KIND, FactoredProjector
from inference.sketch import (
    DEFAULT_CACHED_ADAPTERS,
    IGNORE,
    EncodedPair,
    check_index_method,
    collate,
    encode_pairs,
    files_version,
    layout_hash,
    pad_id,
)
from inference.tokenizer import Prompt

DEFAULT_MAX_BATCH = 32
# Ranks this code reads; the serving pools decide what is served.
MAX_RANK = 1024


def completion_losses(
    model: nn.Module, ids: Tensor, mask: Tensor, labels: Tensor
) -> Tensor:
    """`inference.sketch.per_example_loss`, with the vocabulary projection run only where
    a completion token is predicted: prompt and padding positions cost no logits."""
    hidden = model.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    targets = labels[:, 1:]
    rows, columns = (targets != IGNORE).nonzero(as_tuple=True)
    logits = model.lm_head(hidden[rows, columns]).float()
    nll = nn.functional.cross_entropy(logits, targets[rows, columns], reduction="none")
    totals = torch.zeros(ids.shape[0], dtype=nll.dtype, device=nll.device).index_add_(0, rows, nll)
    return totals / (targets != IGNORE).sum(dim=1).clamp(min=1)


@dataclass(frozen=True)
class _Active:
    a: Tensor  # [B, rank, in], zero rows beyond an example's rank
    b: Tensor  # [B, out, rank]
    scale: Tensor  # [B]


class MultiLoraLinear(nn.Module):
    """A frozen linear layer plus each example's own LoRA delta, recording its factors."""

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.base = base
        self.active: _Active | None = None
        self.factors: tuple[Tensor, Tensor, Tensor] | None = None  # (x, h, o) of the last pass

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        active = self.active
        if active is None:
            return y
        h = torch.bmm(x, active.a.transpose(1, 2))
        if not h.requires_grad:  # the first LoRA layer: the backward starts its graph here
            h.requires_grad_()
        o = torch.bmm(h, active.b.transpose(1, 2))
        self.factors = (x.detach(), h, o)
        return y + o * active.scale[:, None, None]


@dataclass(frozen=True)
class _Parameter:
    module: tuple[int, str]  # (layer, target)
    side: str  # "A" or "B"
    rank: int


@dataclass(frozen=True)
class _Adapter:
    version: tuple[int, ...]  # sketch.files_version when read
    weights: AdapterWeights
    max_length: int
    projector: FactoredProjector
    parameters: dict[str, _Parameter]  # canonical name -> where its factors are


def _layout(weights: AdapterWeights) -> tuple[list[tuple[str, tuple[int, int]]], dict]:
    """The adapter's (canonical name, shape) layout, sorted, as peft names its weights."""
    layout, parameters = [], {}
    for (layer, target), module in weights.modules.items():
        prefix = f"base_model.model.model.layers.{layer}.{PROJECTION_PARENT[target]}.{target}"
        for side, tensor in (("A", module.a), ("B", module.b)):
            name = f"{prefix}.lora_{side}.weight"
            layout.append((name, tuple(tensor.shape)))
            parameters[name] = _Parameter((layer, target), side, module.rank)
    return sorted(layout), parameters


class BatchedSketcher:
    """Sketches (adapter, prompt, completion) jobs of any mix of adapters whose index uses the
    factored projection, with the k, seed and max length recorded in each adapter's index."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        model_config: ModelConfig,
        max_batch: int = DEFAULT_MAX_BATCH,
        cached_adapters: int = DEFAULT_CACHED_ADAPTERS * 4,  # a batch mixes many adapters
    ) -> None:
        for param in model.parameters():
            param.requires_grad_(False)
        model.eval()
        self.model = model
        self.tokenizer = tokenizer
        self.model_config = model_config
        self.max_batch = max_batch
        self._cached_adapters = cached_adapters
        self._param = next(model.parameters())
        self._adapters: OrderedDict[Path, _Adapter] = OrderedDict()
        self._projectors: dict[tuple[str, int, int], FactoredProjector] = {}
        self._layers: dict[tuple[int, str], MultiLoraLinear] = {}
        for index, layer in enumerate(model.model.layers):
            for target in LORA_TARGETS:
                parent = getattr(layer, PROJECTION_PARENT[target])
                wrapper = MultiLoraLinear(getattr(parent, target))
                setattr(parent, target, wrapper)
                self._layers[(index, target)] = wrapper

    @classmethod
    def load(
        cls, base_model_dir: Path, device: str | torch.device = "cpu", **kwargs: int
    ) -> BatchedSketcher:
        from inference.base_model import load_base_model

        model, tokenizer = load_base_model(base_model_dir, device)
        if torch.device(device).type == "cpu":
            # On the CPU, for the short sequences sketched here, plain attention is about a
            # quarter faster than the fused kernel, forward and backward.
            model.set_attn_implementation("eager")
        return cls(model, tokenizer, ModelConfig.from_model_dir(base_model_dir), **kwargs)

    @property
    def projection(self) -> str:
        return FACTORED_KIND

    def adapter(self, adapter_dir: Path) -> _Adapter:
        """The adapter's weights and projection, from the cache unless its files changed."""
        adapter_dir = Path(adapter_dir)
        version = files_version(adapter_dir)
        adapter = self._adapters.pop(adapter_dir, None)
        if adapter is None or adapter.version != version:
            adapter = self._read(adapter_dir, version)
        self._adapters[adapter_dir] = adapter
        while len(self._adapters) > self._cached_adapters:
            self._adapters.popitem(last=False)
        return adapter

    def _read(self, adapter_dir: Path, version: tuple[int, ...]) -> _Adapter:
        meta = read_index_meta(adapter_dir / "attribution_index")
        check_index_method(adapter_dir, meta, (FACTORED_KIND,))
        weights = load_peft_adapter(
            adapter_dir, self.model_config, max_rank=MAX_RANK, dtype=self._param.dtype
        )
        layout, parameters = _layout(weights)
        digest = layout_hash(layout)
        if digest != meta["param_layout_hash"]:
            raise ValueError(
                f"adapter in {adapter_dir} does not match its index's parameter layout"
            )
        key = (digest, int(meta["k"]), int(meta["seed"]))
        if key not in self._projectors:
            self._projectors[key] = FactoredProjector(layout, key[1], key[2], self._param.device)
        device = self._param.device
        modules = {
            place: LoraModule(module.a.to(device), module.b.to(device), module.scale)
            for place, module in weights.modules.items()
        }
        weights = AdapterWeights(weights.adapter_id, weights.version, modules)
        return _Adapter(version, weights, int(meta["max_length"]), self._projectors[key],
                        parameters)

    def sketch(self, jobs: Sequence[tuple[Path, Prompt, str]]) -> list[np.ndarray]:
        """[k] float32 sketch of each (adapter directory, prompt, completion), in passes of at
        most `max_batch` examples of similar length. Raises when an adapter cannot be read:
        the caller decides what to do with the jobs of a broken adapter."""
        unique = {directory: self.adapter(directory) for directory in {job[0] for job in jobs}}
        adapters = [unique[directory] for directory, _, _ in jobs]
        encoded: list[EncodedPair | None] = [None] * len(jobs)
        by_length: dict[int, list[int]] = {}
        for i, adapter in enumerate(adapters):
            by_length.setdefault(adapter.max_length, []).append(i)
        for max_length, indices in by_length.items():
            pairs = [(jobs[i][1], jobs[i][2]) for i in indices]
            for i, pair in zip(indices, encode_pairs(self.tokenizer, pairs, max_length),
                               strict=True):
                encoded[i] = pair
        order = sorted(range(len(jobs)), key=lambda i: len(encoded[i].input_ids))
        sketches: list[np.ndarray] = [np.zeros(0, np.float32)] * len(jobs)
        for start in range(0, len(order), self.max_batch):
            chunk = order[start : start + self.max_batch]
            values = self._pass([encoded[i] for i in chunk], [adapters[i] for i in chunk])
            for i, row in zip(chunk, values, strict=True):
                sketches[i] = row
        return sketches

    def _pass(self, encoded: list[EncodedPair], adapters: list[_Adapter]) -> list[np.ndarray]:
        device = self._param.device
        ids, mask, labels = collate(encoded, pad_id(self.tokenizer), device)
        active = self._activate(adapters)
        try:
            with torch.enable_grad():
                losses = completion_losses(self.model, ids, mask, labels)
                factors = {place: self._layers[place].factors for place in active}
                tensors = [t for x_h_o in factors.values() for t in x_h_o[1:]]
                grads = iter(torch.autograd.grad(losses.sum(), tensors))
        finally:
            for layer in self._layers.values():
                layer.active, layer.factors = None, None
        gradients = {place: (next(grads), next(grads)) for place in factors}
        groups: dict[int, list[int]] = {}
        for i, adapter in enumerate(adapters):
            groups.setdefault(id(adapter.projector), []).append(i)
        out: list[np.ndarray] = [np.zeros(0, np.float32)] * len(adapters)
        for members in groups.values():
            projector = adapters[members[0]].projector
            parameters = adapters[members[0]].parameters
            rows = torch.tensor(members, device=device)
            whole = len(members) == len(adapters)

            def pick(t: Tensor, rows: Tensor = rows, whole: bool = whole) -> Tensor:
                return t if whole else t.index_select(0, rows)

            total = torch.zeros(len(members), projector.k, device=device, dtype=self._param.dtype)
            for name, _ in projector.layout:
                parameter = parameters[name]
                x, h, _ = factors[parameter.module]
                dh, do = gradients[parameter.module]
                rank = parameter.rank
                if parameter.side == "A":
                    part = projector.project_factors(name, pick(x), pick(dh)[..., :rank])
                else:
                    part = projector.project_factors(name, pick(h.detach())[..., :rank], pick(do))
                total += part.to(total.dtype)
            values = total.float().cpu().numpy()
            for row, i in enumerate(members):
                out[i] = values[row]
        return out

    def _activate(self, adapters: list[_Adapter]) -> list[tuple[int, str]]:
        """Give every wrapped layer the per-example A, B and scale of this batch; returns the
        layers some example adapts."""
        unique: dict[int, _Adapter] = {}
        for adapter in adapters:
            unique.setdefault(id(adapter), adapter)
        position = {key: n for n, key in enumerate(unique)}
        rows = torch.tensor([position[id(a)] for a in adapters], device=self._param.device)
        active = []
        for place, layer in self._layers.items():
            modules = [adapter.weights.modules.get(place) for adapter in unique.values()]
            present = [m for m in modules if m is not None]
            if not present:
                continue
            rank = max(m.rank for m in present)
            a = torch.zeros(len(modules), rank, present[0].a.shape[1], dtype=self._param.dtype,
                            device=self._param.device)
            b = torch.zeros(len(modules), present[0].b.shape[0], rank, dtype=self._param.dtype,
                            device=self._param.device)
            scale = torch.zeros(len(modules), dtype=self._param.dtype)
            for n, module in enumerate(modules):
                if module is not None:
                    a[n, : module.rank] = module.a
                    b[n, :, : module.rank] = module.b
                    scale[n] = module.scale
            scale = scale.to(self._param.device)
            layer.active = _Active(a[rows], b[rows], scale[rows])
            active.append(place)
        return active
