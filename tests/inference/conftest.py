"""Shared inference fixtures: a base model built from the `test` preset (seconds, once per
session), a small synthetic datanet with planted facts, and one adapter trained on it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from inference.base_model import build_base_model
from inference.data import SyntheticDatanet, generate_datanet
from inference.datanets import DatanetStore, Snapshot
from inference.factory import TrainConfig, TrainResult, train_adapter

# Enough steps for the adapter to learn the planted facts of a small datanet.
SMALL_TRAIN = TrainConfig(steps=200, lr=3e-3, seed=0, batch_size=8, index_k=256)


@pytest.fixture(scope="session")
def small_train() -> TrainConfig:
    return SMALL_TRAIN


@pytest.fixture(scope="session")
def base_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A base model checkpoint of the `test` preset, built under the session's temp dir."""
    root = tmp_path_factory.mktemp("base")
    torch.set_num_threads(1)
    info = build_base_model(root / "base-model", root / "cache", preset_name="test", seed=0)
    return info.directory


@dataclass(frozen=True)
class SmallDatanet:
    synthetic: SyntheticDatanet
    store: DatanetStore
    snapshot: Snapshot


@pytest.fixture(scope="session")
def small_datanet(tmp_path_factory: pytest.TempPathFactory) -> SmallDatanet:
    """6 contributors, 2 planted facts each (2 phrasings per fact), snapshotted."""
    synthetic = generate_datanet("commons", seed=0, contributors=6, rows_per_contributor=6)
    store = DatanetStore(tmp_path_factory.mktemp("datanets"))
    store.create("commons", "synthetic rows with planted facts")
    for row in synthetic.rows:
        store.add("commons", row.contributor_id, row.text, row.license)
    store.snapshot("commons")
    return SmallDatanet(synthetic, store, store.load_snapshot("commons"))


@pytest.fixture(scope="session")
def trained_adapter(
    tmp_path_factory: pytest.TempPathFactory, base_model_dir: Path, small_datanet: SmallDatanet
) -> TrainResult:
    adapters = tmp_path_factory.mktemp("adapters")
    return train_adapter(
        small_datanet.snapshot, "commons-a", "owner-1", base_model_dir, adapters, SMALL_TRAIN
    )
