"""The adapters step: an adapter is retrained only when its inputs changed."""

from __future__ import annotations

from demo_support import prepared

from inference.factory import TrainConfig
from loraledger.demo.steps.training import adapter_is_current


def test_adapter_is_current_only_for_the_same_snapshot_config_and_base(tmp_path):
    snapshot = prepared(tmp_path, 0).snapshot
    config = TrainConfig(steps=5)
    manifest = {
        "snapshot_hash": snapshot.manifest.snapshot_hash,
        "training_config": config.to_record(),
        "base_model_hash": "b" * 64,
    }
    assert adapter_is_current(manifest, snapshot, config, "b" * 64)
    assert not adapter_is_current(manifest, snapshot, TrainConfig(steps=6), "b" * 64)
    assert not adapter_is_current(manifest, snapshot, config, "c" * 64)
    assert not adapter_is_current({**manifest, "snapshot_hash": "0" * 64}, snapshot, config,
                                  "b" * 64)
    assert not adapter_is_current(None, snapshot, config, "b" * 64)
