"""The adapter store: one directory per valid id, every path inside it from one place, and the
manifest parsed and validated once into an AdapterManifest whose bytes do not change."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from inference.adapter_store import (
    AdapterDir,
    AdapterManifest,
    AdapterRefused,
    AdapterStore,
    InvalidAdapterId,
    UnknownAdapter,
)
from inference.adapters import save_peft_adapter
from inference.config import ModelConfig
from inference.factory import TrainConfig
from infra.settings import load_settings
from schemas.codec import decode, encode
from schemas.events import AdapterRegistered

TINY = ModelConfig.from_preset("tiny")
BAD_IDS = ["../x", "../escape", "a/b", "", ".hidden", "x" * 129, "sp ace"]

# A manifest as the ModelFactory has always written it: these exact bytes must parse and be
# written back unchanged, so existing adapters keep their manifest hash.
WRITTEN = {
    "adapter_id": "commons-a",
    "owner_id": "olga",
    "format": "peft-lora",
    "base_model_hash": "a" * 64,
    "weights_hash": "b" * 64,
    "rank": 8,
    "datanet_id": "commons",
    "snapshot_version": 2,
    "snapshot_hash": "c" * 64,
    "training_rows": 24,
    "training_rows_hash": "d" * 64,
    "training_config": TrainConfig().to_record(),
    "contributors": ["ann", "bob"],
    "index_hash": "e" * 64,
    "first_loss": 5.123457,
    "last_loss": 1.5,
}
WRITTEN_BYTES = json.dumps(WRITTEN, indent=2, sort_keys=True) + "\n"


def _save_adapter(directory: Path) -> Path:
    in_features, out_features = TINY.projection_shape("q_proj")
    modules = {(0, "q_proj"): (torch.zeros(2, in_features), torch.zeros(out_features, 2))}
    save_peft_adapter(directory, modules, lora_alpha=4)
    return directory


def test_paths_inside_an_adapter_directory(tmp_path: Path) -> None:
    adapter = AdapterStore(tmp_path).adapter_dir("ad-1")
    assert adapter.path == tmp_path / "ad-1" and adapter.adapter_id == "ad-1"
    assert adapter.config_path == tmp_path / "ad-1" / "adapter_config.json"
    assert adapter.weights_path == tmp_path / "ad-1" / "adapter_model.safetensors"
    assert adapter.manifest_path == tmp_path / "ad-1" / "manifest.json"
    assert adapter.index_dir == tmp_path / "ad-1" / "attribution_index"


def test_the_store_root_comes_from_settings(tmp_path: Path) -> None:
    settings = load_settings({"LORALEDGER_HOME": str(tmp_path)})
    assert AdapterStore.from_settings(settings).root == settings.adapters_dir


@pytest.mark.parametrize("bad_id", BAD_IDS)
def test_ids_that_are_not_one_path_component_are_refused(tmp_path: Path, bad_id: str) -> None:
    store = AdapterStore(tmp_path)
    assert not store.exists(bad_id)
    for call in (store.adapter_dir, store.staging_dir, store.manifest):
        with pytest.raises(InvalidAdapterId, match="invalid adapter id") as caught:
            call(bad_id)
        # One error for every caller: an unknown adapter to the server, a bad value to the CLI.
        assert isinstance(caught.value, UnknownAdapter) and isinstance(caught.value, ValueError)


def test_the_store_lists_adapters_and_skips_staging(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path)
    _save_adapter(tmp_path / "one")
    _save_adapter(store.staging_dir("two").path)
    (tmp_path / "empty").mkdir()
    assert store.staging_dir("two").path.name.startswith(".two.")
    assert list(store.ids()) == ["one"]
    assert store.exists("one") and not store.exists("two") and not store.exists("empty")
    assert store.manifests() == []
    store.adapter_dir("one").write_manifest(AdapterManifest(**{**WRITTEN, "adapter_id": "one"}))
    assert [m.adapter_id for m in store.manifests()] == ["one"]


def test_an_adapter_without_a_manifest_is_unknown(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path)
    _save_adapter(tmp_path / "bare")
    assert store.adapter_dir("bare").read_manifest() is None
    with pytest.raises(UnknownAdapter, match="unknown adapter 'bare'"):
        store.manifest("bare")


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("{not json", "invalid manifest.json: manifest: Invalid JSON"),
        (json.dumps({**WRITTEN, "extra": 1}), "extra: Extra inputs are not permitted"),
        (json.dumps({**WRITTEN, "owner_id": "../root"}), "owner_id: Value error"),
        (json.dumps({**WRITTEN, "weights_hash": "XYZ"}), "weights_hash: String should match"),
        (json.dumps({**WRITTEN, "format": "gguf"}), "format: Input should be 'peft-lora'"),
    ],
)
def test_an_invalid_manifest_is_refused_with_the_reason(
    tmp_path: Path, text: str, reason: str
) -> None:
    store = AdapterStore(tmp_path)
    store.adapter_dir("ad").path.mkdir()
    store.adapter_dir("ad").manifest_path.write_text(text)
    with pytest.raises(AdapterRefused, match=reason):
        store.manifest("ad")


def test_the_manifest_refuses_unknown_fields_and_bad_ids_and_is_frozen() -> None:
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        AdapterManifest(**WRITTEN, created_at="2024-01-01T00:00:00Z")
    with pytest.raises(ValidationError, match="invalid id"):
        AdapterManifest(**{**WRITTEN, "adapter_id": "../x"})
    with pytest.raises(ValidationError, match="Field required"):
        AdapterManifest(**{k: v for k, v in WRITTEN.items() if k != "training_rows_hash"})
    manifest = AdapterManifest(**WRITTEN)
    with pytest.raises(ValidationError, match="frozen"):
        manifest.rank = 4  # type: ignore[misc]


def test_written_manifests_read_back_byte_for_byte(tmp_path: Path) -> None:
    manifest = AdapterManifest.from_json(WRITTEN_BYTES)
    assert manifest.to_json() == WRITTEN_BYTES
    assert manifest.adapter_hash is None
    assert manifest.model_dump(exclude={"adapter_hash"}) == WRITTEN
    adapter = AdapterDir(tmp_path)
    adapter.write_manifest(manifest)
    assert adapter.manifest_path.read_text() == WRITTEN_BYTES
    assert adapter.read_manifest() == manifest


def test_a_nan_loss_is_written_as_before() -> None:
    diverged = {**WRITTEN, "last_loss": float("nan")}
    text = json.dumps(diverged, indent=2, sort_keys=True) + "\n"
    manifest = AdapterManifest.from_json(text)
    assert math.isnan(manifest.last_loss) and manifest.to_json() == text


def test_the_registration_event_carries_the_manifests_facts() -> None:
    manifest = AdapterManifest(**WRITTEN)
    event = manifest.registration_event()
    facts = set(AdapterRegistered.model_fields) - {"schema_version", "created_at"}
    assert event.model_dump(include=facts) == manifest.model_dump(include=facts)
    assert facts < set(AdapterManifest.model_fields)
    raw = encode(event)
    assert raw.startswith(b'{"schema_version":1,"created_at":')
    assert decode("adapters", raw) == event


def test_a_manifest_with_the_adapter_hash_writes_it() -> None:
    manifest = AdapterManifest(**WRITTEN, adapter_hash="f" * 64)
    assert json.loads(manifest.to_json())["adapter_hash"] == "f" * 64
    assert AdapterManifest.from_json(manifest.to_json()) == manifest
