"""The adapters step: an adapter is retrained only when its inputs changed."""

from __future__ import annotations

from demo_support import prepared

from inference.adapter_store import AdapterManifest
from inference.factory import TrainConfig
from loraledger.demo.steps.training import adapter_is_current


def test_adapter_is_current_only_for_the_same_snapshot_config_and_base(tmp_path):
    snapshot = prepared(tmp_path, 0).snapshot
    config = TrainConfig(steps=5)
    manifest = AdapterManifest(
        adapter_id="demo-legal", owner_id="legal-steward", base_model_hash="b" * 64,
        weights_hash="0" * 64, rank=4, datanet_id="legal", snapshot_version=1,
        snapshot_hash=snapshot.manifest.snapshot_hash, training_config=config.to_record(),
        training_rows=1, training_rows_hash="0" * 64, first_loss=1.0, last_loss=0.5,
        adapter_hash="a" * 64,
    )
    assert adapter_is_current(manifest, snapshot, config, "b" * 64)
    assert not adapter_is_current(manifest, snapshot, TrainConfig(steps=6), "b" * 64)
    assert not adapter_is_current(manifest, snapshot, config, "c" * 64)
    other_snapshot = manifest.model_copy(update={"snapshot_hash": "0" * 64})
    assert not adapter_is_current(other_snapshot, snapshot, config, "b" * 64)
    assert not adapter_is_current(None, snapshot, config, "b" * 64)
    unpinned_config = manifest.model_copy(update={"adapter_hash": None})
    assert not adapter_is_current(unpinned_config, snapshot, config, "b" * 64)
