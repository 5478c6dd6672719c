"""A complete, valid manifest for adapters that tests write by hand (no training): placeholder
provenance, the directory's real weights and adapter hashes, and whatever fields a test sets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from inference.adapter_store import AdapterDir, AdapterManifest

PLACEHOLDER_HASH = "0" * 64


def write_manifest(directory: Path, **fields: Any) -> AdapterManifest:
    """Write `directory`'s manifest.json and return it; `fields` override the placeholders."""
    adapter = AdapterDir(Path(directory))
    values: dict[str, Any] = {
        "adapter_id": adapter.adapter_id,
        "owner_id": "owner-test",
        "base_model_hash": PLACEHOLDER_HASH,
        "weights_hash": adapter.weights_hash(),
        "adapter_hash": adapter.adapter_hash(),
        "rank": 4,
        "datanet_id": "datanet-test",
        "snapshot_version": 1,
        "snapshot_hash": PLACEHOLDER_HASH,
        "training_rows": 1,
        "training_rows_hash": PLACEHOLDER_HASH,
        "first_loss": 1.0,
        "last_loss": 0.5,
        **fields,
    }
    manifest = AdapterManifest(**values)
    adapter.write_manifest(manifest)
    return manifest
