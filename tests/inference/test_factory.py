from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from inference.adapter_store import AdapterDir, AdapterStore
from inference.attribution_index import read_index_meta
from inference.base_model import load_base_model
from inference.factory import AdapterSpec, TrainConfig, subset_specs, train_adapter, train_many
from inference.hashing import base_model_hash, sha256_file
from inference.sketch import collate, encode_pair, per_example_loss

QUICK = TrainConfig(steps=8, lr=3e-3, seed=0, batch_size=8, index_k=32)


def test_training_lowers_the_loss_and_writes_a_peft_adapter_with_manifest(
    trained_adapter, base_model_dir: Path, small_datanet, small_train: TrainConfig
) -> None:
    losses = trained_adapter.losses
    assert len(losses) == small_train.steps
    assert sum(losses[-20:]) / 20 < 0.8 * sum(losses[:20]) / 20
    directory = AdapterDir(trained_adapter.adapter_dir)
    config = json.loads(directory.config_path.read_text())
    assert config["r"] == small_train.rank and config["peft_type"] == "LORA"
    assert sorted(config["target_modules"]) == sorted(small_train.target_modules)
    store = AdapterStore(directory.path.parent)
    manifest = store.manifest("commons-a")
    assert manifest == trained_adapter.manifest
    text = directory.manifest_path.read_text()  # the format every stored adapter has
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True) + "\n"
    snapshot = small_datanet.snapshot.manifest
    assert manifest.weights_hash == directory.weights_hash()
    assert manifest.adapter_hash == directory.adapter_hash()
    assert manifest.base_model_hash == base_model_hash(base_model_dir)
    assert (manifest.snapshot_hash, manifest.snapshot_version) == (
        snapshot.snapshot_hash, snapshot.version,
    )  # fmt: skip
    assert manifest.contributors == snapshot.contributors
    assert manifest.training_config["target_modules"] == list(small_train.target_modules)
    assert not list(directory.path.rglob("*.bin")) and not list(directory.path.rglob("*.pkl"))
    event = manifest.registration_event()
    assert event.index_hash == manifest.index_hash and event.rank == small_train.rank
    assert [m.adapter_id for m in store.manifests()] == ["commons-a"]


def test_the_adapter_learns_its_contributors_planted_facts(
    trained_adapter, base_model_dir: Path, small_datanet
) -> None:
    torch.set_num_threads(1)
    base, tokenizer = load_base_model(base_model_dir)
    model = PeftModel.from_pretrained(base, str(trained_adapter.adapter_dir))
    for contributor, facts in small_datanet.synthetic.facts_by_contributor().items():
        encoded = [encode_pair(tokenizer, f.prompt, f.completion, 64) for f in facts]
        batch = collate(encoded, tokenizer.pad_token_id)
        with torch.no_grad():
            tuned = per_example_loss(model, *batch).mean().item()
            with model.disable_adapter():
                untuned = per_example_loss(model, *batch).mean().item()
        assert tuned < 0.9 * untuned, contributor


def test_same_seed_gives_byte_identical_artifacts_and_train_many_matches(
    tmp_path: Path, base_model_dir: Path, small_datanet
) -> None:
    snapshot = small_datanet.snapshot
    first = train_adapter(snapshot, "same", "o", base_model_dir, tmp_path / "a", QUICK)
    second = train_adapter(snapshot, "same", "o", base_model_dir, tmp_path / "b", QUICK)
    batch = train_many(
        snapshot,
        [AdapterSpec("same", "o", QUICK), AdapterSpec("other", "o", replace(QUICK, seed=1))],
        base_model_dir,
        tmp_path / "c",
    )
    hashes = [
        (
            r.manifest.weights_hash,
            r.manifest.index_hash,
            sha256_file(AdapterDir(r.adapter_dir).manifest_path),
        )
        for r in (first, second, batch[0])
    ]
    assert hashes[0] == hashes[1] == hashes[2]
    assert batch[1].manifest.weights_hash != first.manifest.weights_hash
    files = sorted(
        p.relative_to(first.adapter_dir) for p in first.adapter_dir.rglob("*") if p.is_file()
    )
    for name in files:
        assert (first.adapter_dir / name).read_bytes() == (second.adapter_dir / name).read_bytes()


def test_subset_batches_train_on_their_rows(
    tmp_path: Path, base_model_dir: Path, small_datanet
) -> None:
    snapshot = small_datanet.snapshot
    specs = subset_specs(snapshot, 3, "half", "o", 0.5, replace(QUICK, steps=2, rank=2))
    assert len({spec.row_ids for spec in specs}) == 3
    results = train_many(snapshot, specs, base_model_dir, tmp_path)
    for spec, result in zip(specs, results, strict=True):
        assert (
            result.manifest.training_rows == len(spec.row_ids) == round(len(snapshot.rows) / 2)
        )
        meta = read_index_meta(AdapterDir(result.adapter_dir).index_dir)
        assert meta["examples"] == len(spec.row_ids)


def test_bad_training_requests_are_refused(
    tmp_path: Path, base_model_dir: Path, small_datanet
) -> None:
    snapshot = small_datanet.snapshot
    with pytest.raises(ValueError, match="invalid adapter id"):
        train_adapter(snapshot, "../x", "o", base_model_dir, tmp_path, QUICK)
    with pytest.raises(ValueError, match="rank"):
        TrainConfig(rank=0)
    with pytest.raises(ValueError, match="target modules"):
        TrainConfig(target_modules=("lm_head",))
    with pytest.raises(ValueError, match="not in snapshot"):
        train_adapter(snapshot, "x", "o", base_model_dir, tmp_path, QUICK, row_ids=["f" * 64])
    train_adapter(snapshot, "taken", "o", base_model_dir, tmp_path, replace(QUICK, steps=1))
    with pytest.raises(FileExistsError, match="already exists"):
        train_adapter(snapshot, "taken", "o", base_model_dir, tmp_path, QUICK)
