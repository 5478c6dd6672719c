"""ModelFactory: fine-tune LoRA adapters with peft on a datanet snapshot, on the CPU, and store
each one in the adapter store (`inference.adapter_store`): PEFT format, its attribution index
and its manifest (owner, hashes of base model, weights, snapshot and index, training config,
contributors). No timestamps: the same inputs and seed give byte-identical files.

Training is deterministic: one thread, seeded LoRA init, a seeded fixed data order, no dropout.
Publishing the AdapterRegistered event is separate (`AdapterManifest.registration_event`), so
training works with no broker.
"""

from __future__ import annotations

import os
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaForCausalLM, PreTrainedTokenizerBase

from inference.adapter_store import AdapterManifest, AdapterStore
from inference.attribution_index import (
    DEFAULT_LAMBDA_RELATIVE,
    EKFAC_PROJECTED,
    ESTIMATORS,
    TRAK,
    IndexExample,
    write_index,
)
from inference.base_model import load_base_model, single_thread
from inference.datanets import DatanetRow, Snapshot, snapshot_hash
from inference.hashing import base_model_hash
from inference.influence_preconditioner import (
    DEFAULT_DAMPING_RELATIVE,
    DEFAULT_PRIOR_DAMPING_RELATIVE,
    ekfac_projected_features,
)
from inference.sketch import (
    DEFAULT_K,
    LOSS_DEFINITION,
    PROJECTION_KIND,
    AnyProjector,
    collate,
    encode_pair,
    layout_hash,
    lora_layers,
    make_projector,
    param_layout,
    per_example_loss,
    projected_gradient,
)
from schemas.ids import check_id

LORA_TARGETS: tuple[str, ...] = (
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
)  # fmt: skip

ProgressFn = Callable[[int, int, float], None]  # (step, total_steps, loss)


@dataclass(frozen=True)
class TrainConfig:
    rank: int = 8
    alpha: float = 16.0
    steps: int = 200
    lr: float = 3e-3
    seed: int = 0
    batch_size: int = 8
    max_length: int = 64
    target_modules: tuple[str, ...] = LORA_TARGETS
    index_k: int = DEFAULT_K
    projection_seed: int = 0
    index_estimator: str = EKFAC_PROJECTED[0]
    index_lambda_relative: float = DEFAULT_LAMBDA_RELATIVE  # `trak` only
    index_damping_relative: float = DEFAULT_DAMPING_RELATIVE  # `ekfac-projected` only
    index_prior_damping_relative: float = DEFAULT_PRIOR_DAMPING_RELATIVE  # `ekfac-projected`
    index_batch_size: int = 32

    def __post_init__(self) -> None:
        if not 1 <= self.rank <= 256:
            raise ValueError(f"rank must be between 1 and 256, got {self.rank}")
        if self.steps < 1 or self.batch_size < 1 or self.max_length < 2 or self.index_k < 1:
            raise ValueError("steps, batch_size and index_k must be >= 1 and max_length >= 2")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        known = [name for name, _ in ESTIMATORS]
        if self.index_estimator not in known:
            raise ValueError(f"index_estimator must be one of {known}: {self.index_estimator!r}")
        dampings = (
            self.index_lambda_relative,
            self.index_damping_relative,
            self.index_prior_damping_relative,
        )
        if not all(value > 0 for value in dampings):
            raise ValueError("index_lambda_relative and the index dampings must be positive")
        unknown = set(self.target_modules) - set(LORA_TARGETS)
        if unknown or not self.target_modules:
            raise ValueError(f"target modules must be a non-empty subset of {LORA_TARGETS}")

    def to_record(self) -> dict[str, float | int | str | bool | list[str]]:
        record = asdict(self)
        record["target_modules"] = list(self.target_modules)
        return record


@dataclass(frozen=True)
class AdapterSpec:
    """One adapter of a batch: its id, owner, config, and which snapshot rows it trains on
    (None: all)."""

    adapter_id: str
    owner_id: str
    config: TrainConfig = field(default_factory=TrainConfig)
    row_ids: tuple[str, ...] | None = None


@dataclass(frozen=True)
class TrainResult:
    adapter_dir: Path
    manifest: AdapterManifest
    losses: list[float]  # per step
    train_seconds: float
    index_seconds: float


def lora_config(config: TrainConfig) -> LoraConfig:
    return LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=0.0,
        target_modules=list(config.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


def _select_rows(snapshot: Snapshot, row_ids: Sequence[str] | None) -> list[DatanetRow]:
    if row_ids is None:
        return list(snapshot.rows)
    by_id = {row.row_id: row for row in snapshot.rows}
    missing = [row_id for row_id in row_ids if row_id not in by_id]
    if missing:
        raise ValueError(f"{len(missing)} row ids are not in snapshot v{snapshot.manifest.version}")
    # Snapshot order, whatever order the subset was given in: the data order depends on the seed.
    wanted = set(row_ids)
    return [row for row in snapshot.rows if row.row_id in wanted]


def _train_steps(
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    rows: list[DatanetRow],
    config: TrainConfig,
    progress: ProgressFn | None,
) -> list[float]:
    examples = [encode_pair(tokenizer, "", row.text, config.max_length) for row in rows]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    order_rng = torch.Generator().manual_seed(config.seed)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=0.0)
    model.train()
    order = torch.randperm(len(examples), generator=order_rng)
    cursor = 0
    losses = []
    for step in range(config.steps):
        if cursor >= len(order):
            order = torch.randperm(len(examples), generator=order_rng)
            cursor = 0
        picked = order[cursor : cursor + config.batch_size].tolist()
        cursor += config.batch_size
        ids, mask, labels = collate([examples[i] for i in picked], pad)
        loss = per_example_loss(model, ids, mask, labels).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if progress is not None:
            progress(step + 1, config.steps, losses[-1])
    model.eval()
    return losses


def _save_adapter(model: PeftModel, directory: Path) -> None:
    # The checkpoint path of the base would tie the file to this machine; the manifest names the
    # base by its hash instead.
    model.peft_config["default"].base_model_name_or_path = None
    model.save_pretrained(str(directory), safe_serialization=True)
    (directory / "README.md").unlink(missing_ok=True)


def _index_features(
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    rows: list[DatanetRow],
    projector: AnyProjector,
    config: TrainConfig,
) -> tuple[np.ndarray, tuple[str, str], dict[str, float]]:
    """The index's feature rows for `config.index_estimator`, the estimator and its params."""
    texts = [row.text for row in rows]
    layers = lora_layers(model)
    if config.index_estimator == TRAK[0]:
        sketches = projected_gradient(
            model,
            tokenizer,
            [("", text) for text in texts],
            projector,
            config.max_length,
            config.index_batch_size,
            layers,
        )
        return sketches, TRAK, {}
    features = ekfac_projected_features(
        model,
        tokenizer,
        texts,
        projector,
        config.max_length,
        config.index_batch_size,
        config.index_damping_relative,
        config.index_prior_damping_relative,
        layers,
    )
    params = {
        "damping_relative": config.index_damping_relative,
        "prior_damping_relative": config.index_prior_damping_relative,
    }
    return features, EKFAC_PROJECTED, params


def _train_one(
    base: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    base_hash: str,
    snapshot: Snapshot,
    spec: AdapterSpec,
    store: AdapterStore,
    overwrite: bool,
    progress: ProgressFn | None,
    projectors: dict[tuple[str, int, int], AnyProjector],
) -> tuple[TrainResult, LlamaForCausalLM]:
    """Train, save and index one adapter on `base`; returns the base with LoRA layers removed."""
    config = spec.config
    final = store.adapter_dir(spec.adapter_id)
    check_id(spec.owner_id, "owner id")
    if final.path.exists() and not overwrite:
        raise FileExistsError(f"adapter {spec.adapter_id!r} already exists; pick another id")
    rows = _select_rows(snapshot, spec.row_ids)
    if not rows:
        raise ValueError("no rows to train on")
    staging = store.staging_dir(spec.adapter_id)
    shutil.rmtree(staging.path, ignore_errors=True)
    staging.path.mkdir(parents=True)
    for param in base.parameters():
        param.requires_grad_(False)
    torch.manual_seed(config.seed)  # LoRA A init
    model = get_peft_model(base, lora_config(config))
    try:
        started = time.perf_counter()
        losses = _train_steps(model, tokenizer, rows, config, progress)
        train_seconds = time.perf_counter() - started
        _save_adapter(model, staging.path)

        started = time.perf_counter()
        layout = param_layout(model)
        # Adapters of one shape share a projection: generating it is the costly part of
        # indexing a small adapter.
        key = (layout_hash(layout), config.index_k, config.projection_seed)
        if key not in projectors:
            projectors[key] = make_projector(
                PROJECTION_KIND, layout, config.index_k, config.projection_seed
            )
        projector = projectors[key]
        features, estimator, estimator_params = _index_features(
            model, tokenizer, rows, projector, config
        )
        examples = [
            IndexExample(i, row.row_id, row.contributor_id, row.datanet_id, row.text)
            for i, row in enumerate(rows)
        ]
        index_hash = write_index(
            staging.index_dir,
            features,
            examples,
            seed=config.projection_seed,
            projection=PROJECTION_KIND,
            loss=LOSS_DEFINITION,
            param_layout_hash=layout_hash(layout),
            max_length=config.max_length,
            lambda_relative=config.index_lambda_relative,
            estimator=estimator,
            estimator_params=estimator_params,
        )
        index_seconds = time.perf_counter() - started
    finally:
        base = model.unload()
    manifest = AdapterManifest(
        adapter_id=spec.adapter_id,
        owner_id=spec.owner_id,
        base_model_hash=base_hash,
        weights_hash=staging.weights_hash(),
        adapter_hash=staging.adapter_hash(),
        rank=config.rank,
        datanet_id=snapshot.manifest.datanet_id,
        snapshot_version=snapshot.manifest.version,
        snapshot_hash=snapshot.manifest.snapshot_hash,
        training_rows=len(rows),
        training_rows_hash=snapshot_hash([row.row_id for row in rows]),
        training_config=config.to_record(),
        contributors=sorted({row.contributor_id for row in rows}),
        index_hash=index_hash,
        first_loss=round(losses[0], 6),
        last_loss=round(losses[-1], 6),
    )
    staging.write_manifest(manifest)
    if final.path.exists():
        shutil.rmtree(final.path)
    os.replace(staging.path, final.path)
    return TrainResult(final.path, manifest, losses, train_seconds, index_seconds), base


def train_adapter(
    snapshot: Snapshot,
    adapter_id: str,
    owner_id: str,
    base_model_dir: Path,
    adapters_dir: Path,
    config: TrainConfig | None = None,
    row_ids: Sequence[str] | None = None,
    overwrite: bool = False,
    progress: ProgressFn | None = None,
) -> TrainResult:
    """Fine-tune one LoRA adapter on `snapshot` (or the given subset of its rows)."""
    spec = AdapterSpec(adapter_id, owner_id, config or TrainConfig(), _tuple(row_ids))
    return train_many(snapshot, [spec], base_model_dir, adapters_dir, overwrite, progress)[0]


def train_many(
    snapshot: Snapshot,
    specs: Sequence[AdapterSpec],
    base_model_dir: Path,
    adapters_dir: Path,
    overwrite: bool = False,
    progress: ProgressFn | None = None,
    on_adapter: Callable[[TrainResult], None] | None = None,
) -> list[TrainResult]:
    """Train many adapters with the base model loaded once. Each adapter is identical to the one
    `train_adapter` makes from the same spec."""
    ids = [spec.adapter_id for spec in specs]
    if len(set(ids)) != len(ids):
        raise ValueError("adapter ids in a batch must be distinct")
    base_hash = base_model_hash(base_model_dir)
    store = AdapterStore(adapters_dir)
    results = []
    projectors: dict[tuple[str, int, int], AnyProjector] = {}
    with single_thread():
        base, tokenizer = load_base_model(base_model_dir)
        for spec in specs:
            result, base = _train_one(
                base, tokenizer, base_hash, snapshot, spec, store, overwrite, progress,
                projectors,
            )  # fmt: skip
            results.append(result)
            if on_adapter is not None:
                on_adapter(result)
    return results


def _tuple(row_ids: Sequence[str] | None) -> tuple[str, ...] | None:
    return None if row_ids is None else tuple(row_ids)


def subset_specs(
    snapshot: Snapshot,
    count: int,
    prefix: str,
    owner_id: str,
    fraction: float,
    config: TrainConfig,
) -> list[AdapterSpec]:
    """`count` adapters `PREFIX-0000`..., each on its own seeded random `fraction` of the rows
    (as for the linear datamodeling score, which retrains on random halves)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if count < 1:
        raise ValueError(f"count must be positive, got {count}")
    check_id(f"{prefix}-{count - 1:04d}", "adapter id prefix")
    row_ids = [row.row_id for row in snapshot.rows]
    size = max(1, round(fraction * len(row_ids)))
    specs = []
    for i in range(count):
        rng = random.Random(f"subset:{config.seed}:{i}")
        specs.append(
            AdapterSpec(f"{prefix}-{i:04d}", owner_id, config, tuple(rng.sample(row_ids, size)))
        )
    return specs
