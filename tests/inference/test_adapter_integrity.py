"""Adapter files that must neither wedge nor fool the server: config values out of bounds,
regular-expression pattern keys, files changed after registration, links out of the store, a
load that never returns, and an adapter whose output is not a number."""

from __future__ import annotations

import json
import os
import random
import threading
import time
from pathlib import Path

import pytest
import torch
from adapter_manifests import write_manifest

from inference import adapter_cache
from inference.adapter_cache import AdapterCache, AdapterStatus
from inference.adapter_store import AdapterDir, AdapterRefused, AdapterStore, UnknownAdapter
from inference.adapters import MAX_LORA_ALPHA, load_peft_adapter, save_peft_adapter
from inference.config import LoraServingConfig, ModelConfig
from inference.engine import Engine, EngineConfig, GenerationRequest
from inference.model import load_model
from inference.worker.results import error_result
from pipeline.rewards import fee_for, split_fee
from schemas.events import (
    AttributionRecord,
    ErrorCode,
    InferenceRequest,
    MethodInfo,
    Parameters,
)

TINY = ModelConfig.from_preset("tiny")
RANK = 4


def _save(directory: Path, scale: float = 0.1, seed: int = 0) -> Path:
    generator = torch.Generator().manual_seed(seed)
    modules = {}
    for layer in range(TINY.num_layers):
        for target in ("q_proj", "v_proj"):
            in_features, out_features = TINY.projection_shape(target)
            modules[(layer, target)] = (
                torch.randn(RANK, in_features, generator=generator) * scale,
                torch.randn(out_features, RANK, generator=generator) * scale,
            )
    save_peft_adapter(directory, modules, lora_alpha=2 * RANK)
    return directory


def _edit_config(directory: Path, **changes: object) -> None:
    config_path = AdapterDir(directory).config_path
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), **changes}))


def _load(directory: Path):
    return load_peft_adapter(directory, TINY, max_rank=64)


# --- config bounds -----------------------------------------------------------------------------


def test_a_catastrophic_regex_pattern_key_is_refused_at_once(tmp_path: Path) -> None:
    adapter = _save(tmp_path / "redos")
    # As a regex over a long module name this backtracks for longer than the universe exists.
    _edit_config(adapter, rank_pattern={"(a|aa)+(a|aa)+(a|aa)+$": RANK})
    started = time.perf_counter()
    with pytest.raises(AdapterRefused, match="is not a module-name suffix.*matched literally"):
        _load(adapter)
    assert time.perf_counter() - started < 1.0


@pytest.mark.parametrize(
    "patterns",
    [
        {"alpha_pattern": {".*": 8}},
        {"alpha_pattern": {"q_proj|v_proj": 8}},
        {"rank_pattern": {"x" * 300: RANK}},
        {"rank_pattern": {f"layers.{i}.q_proj": RANK for i in range(1025)}},
        {"rank_pattern": ["q_proj"]},
    ],
)
def test_pattern_keys_must_be_few_short_literal_suffixes(tmp_path: Path, patterns) -> None:
    adapter = _save(tmp_path / "patterns")
    _edit_config(adapter, **patterns)
    with pytest.raises(AdapterRefused, match="rank_pattern|alpha_pattern"):
        _load(adapter)


def test_pattern_keys_match_module_name_suffixes_literally(tmp_path: Path) -> None:
    adapter = _save(tmp_path / "literal")
    # "q_proj" is a suffix of every q_proj; "0.self_attn.v_proj" of layer 0's v_proj only;
    # "_proj" is not a whole dotted component, so it matches nothing.
    _edit_config(
        adapter,
        alpha_pattern={"q_proj": 16, "0.self_attn.v_proj": 2, "_proj": 4000},
    )
    weights = _load(adapter)
    assert weights.modules[(0, "q_proj")].scale == 16 / RANK
    assert weights.modules[(1, "q_proj")].scale == 16 / RANK
    assert weights.modules[(0, "v_proj")].scale == 2 / RANK
    assert weights.modules[(1, "v_proj")].scale == 2 * RANK / RANK  # lora_alpha


@pytest.mark.parametrize(
    "alpha", [1e38, MAX_LORA_ALPHA * 2, 0, -8, float("nan"), float("inf"), True, "8"]
)
def test_lora_alpha_must_be_a_finite_number_in_bounds(tmp_path: Path, alpha) -> None:
    adapter = _save(tmp_path / "alpha")
    _edit_config(adapter, lora_alpha=alpha)
    with pytest.raises(AdapterRefused, match=r"lora_alpha must be a finite number in \(0, 4096\]"):
        _load(adapter)


def test_pattern_values_are_bounded_too(tmp_path: Path) -> None:
    adapter = _save(tmp_path / "values")
    _edit_config(adapter, alpha_pattern={"q_proj": 1e38})
    with pytest.raises(AdapterRefused, match="alpha_pattern\\['q_proj'\\] must be a finite"):
        _load(adapter)
    _edit_config(adapter, alpha_pattern={}, rank_pattern={"q_proj": 0})
    with pytest.raises(AdapterRefused, match="rank_pattern\\['q_proj'\\] must be an integer"):
        _load(adapter)
    _edit_config(adapter, rank_pattern={}, r=True)
    with pytest.raises(AdapterRefused, match="r must be an integer >= 1"):
        _load(adapter)


@pytest.mark.parametrize("text", ["[" * 100_000, '{"r": ' + "9" * 5000 + "}", "\xff"])
def test_a_hostile_config_file_is_a_one_line_refusal(tmp_path: Path, text: str) -> None:
    adapter = _save(tmp_path / "hostile")
    AdapterDir(adapter).config_path.write_text(text, encoding="latin-1")
    with pytest.raises(AdapterRefused, match="cannot read adapter_config.json") as refused:
        _load(adapter)
    assert "\n" not in refused.value.reason


# --- the hash covers config and weights ------------------------------------------------------


def test_a_config_edited_after_registration_is_refused(tmp_path: Path) -> None:
    adapter = _save(tmp_path / "pinned")
    write_manifest(adapter)
    assert _load(adapter).version == AdapterDir(adapter).adapter_hash()
    _edit_config(adapter, lora_alpha=4000)  # within bounds: only the hash can tell
    with pytest.raises(AdapterRefused, match="adapter_config.json was changed after registration"):
        _load(adapter)


def test_the_adapter_hash_covers_both_files_and_which_is_which(tmp_path: Path) -> None:
    files = AdapterDir(_save(tmp_path / "a")).read_files()
    assert files.adapter_hash != files.weights_hash
    swapped = type(files)(config=files.weights, weights=files.config)
    assert swapped.adapter_hash != files.adapter_hash
    longer = type(files)(config=files.config + b" ", weights=files.weights)
    assert longer.adapter_hash != files.adapter_hash


def test_a_manifest_without_the_adapter_hash_is_refused(tmp_path: Path) -> None:
    adapter = _save(tmp_path / "old")
    manifest = write_manifest(adapter)
    AdapterDir(adapter).write_manifest(manifest.model_copy(update={"adapter_hash": None}))
    with pytest.raises(AdapterRefused, match="has no adapter_hash.*retrain it"):
        _load(adapter)


# --- paths that leave the store ----------------------------------------------------------------


def test_an_adapter_directory_linked_from_outside_the_store_is_refused(tmp_path: Path) -> None:
    outside = _save(tmp_path / "outside" / "evil")
    store = AdapterStore(tmp_path / "store")
    store.root.mkdir()
    os.symlink(outside, store.root / "evil")
    assert store.exists("evil")  # it looks servable ...
    with pytest.raises(AdapterRefused, match="its directory is a symbolic link"):
        _load(store.adapter_dir("evil").path)  # ... but is never read


@pytest.mark.parametrize("name", ["adapter_model.safetensors", "adapter_config.json"])
def test_a_linked_file_inside_an_adapter_is_refused(tmp_path: Path, name: str) -> None:
    outside = _save(tmp_path / "outside")
    adapter = _save(tmp_path / "store" / "linked")
    (adapter / name).unlink()
    os.symlink(outside / name, adapter / name)
    with pytest.raises(AdapterRefused, match=f"{name} is a symbolic link"):
        _load(adapter)


def test_a_linked_manifest_is_refused(tmp_path: Path) -> None:
    adapter = _save(tmp_path / "store" / "linked")
    write_manifest(_save(tmp_path / "outside"))
    os.symlink(tmp_path / "outside" / "manifest.json", adapter / "manifest.json")
    with pytest.raises(AdapterRefused, match="manifest.json is a symbolic link"):
        _load(adapter)


def test_a_fifo_in_place_of_the_weights_is_refused_without_blocking(tmp_path: Path) -> None:
    adapter = _save(tmp_path / "fifo")
    (adapter / "adapter_model.safetensors").unlink()
    os.mkfifo(adapter / "adapter_model.safetensors")
    with pytest.raises((AdapterRefused, UnknownAdapter), match="not a regular file|needs"):
        _load(adapter)


# --- load deadline ---------------------------------------------------------------------------


def test_a_stuck_load_times_out_and_never_blocks_others_or_close(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _save(tmp_path / "stuck")
    _save(tmp_path / "fine", seed=1)
    release = threading.Event()
    real_load = adapter_cache.load_peft_adapter

    def slow_load(directory: Path, *args, **kwargs):
        if Path(directory).name == "stuck":
            release.wait(60)  # storage that does not answer
        return real_load(directory, *args, **kwargs)

    monkeypatch.setattr(adapter_cache, "load_peft_adapter", slow_load)
    cache = AdapterCache(
        AdapterStore(tmp_path),
        TINY,
        LoraServingConfig(slots_per_class=(2, 1, 1, 1), load_timeout_s=0.3),
    )
    try:
        started = time.perf_counter()
        with pytest.raises(AdapterRefused, match="did not load within 0.3 s"):
            cache.acquire("stuck")
        assert time.perf_counter() - started < 5
        assert cache.status("stuck") is AdapterStatus.FAILED
        # The only loader thread is stuck: a replacement serves the next load.
        assert cache.acquire("fine").version == AdapterDir(tmp_path / "fine").adapter_hash()
        started = time.perf_counter()
        cache.close()
        assert time.perf_counter() - started < 1
    finally:
        release.set()


# --- non-finite logits -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from multi_lora_fixtures import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("integrity") / "base")


def test_non_finite_logits_end_only_their_request_with_an_unpaid_error(
    model_dir: Path, tmp_path: Path
) -> None:
    torch.set_num_threads(1)
    _save(tmp_path / "good")
    # Finite weights and a bounded alpha, but their product overflows float32: inf, then NaN.
    _save(tmp_path / "overflows", scale=1e20)
    model = load_model(model_dir)
    cache = AdapterCache(
        AdapterStore(tmp_path), model.config, LoraServingConfig(slots_per_class=(2, 1, 1, 1))
    )
    engine = Engine(model, cache, EngineConfig(max_batch_size=4, max_seq_len=32))
    prompt = [5, 6, 7, 8]
    requests = [
        GenerationRequest(prompt, adapter_id=adapter, max_new_tokens=4, stop_token_ids=[])
        for adapter in ("good", "overflows", None)
    ]
    try:
        good, bad, base = engine.generate(requests)
    finally:
        engine.close()
    assert good.status == "ok" and len(good.output_ids) == 4
    assert base.status == "ok" and len(base.output_ids) == 4
    assert bad.status == "error" and bad.error_code is ErrorCode.INTERNAL
    assert "non-finite logits" in bad.error_message and "'overflows'" in bad.error_message

    request = InferenceRequest(adapter_id="overflows", prompt="x")
    result = error_result(
        request, bad.error_code, bad.error_message, worker_id="w", base_model_hash=None
    )
    attribution = AttributionRecord(
        request_id=request.request_id,
        adapter_id="overflows",
        status="failed",
        failure_reason="internal_error: no output",
        method=MethodInfo(name="none", version="0"),
        evidence_hash="0" * 64,
    )
    assert fee_for(result, Parameters()) == 0
    assert split_fee(
        result, attribution, Parameters(), parameters_version=1, adapter_owner="o", epoch=0
    ) == []


def test_a_non_finite_sequence_leaves_nothing_in_its_kv_row(model_dir: Path, tmp_path) -> None:
    """Decoding reads every row of the batch up to its longest sequence (masked): NaN keys
    left by a failed sequence would poison the next sequence of its row (0 * NaN)."""
    torch.set_num_threads(1)
    for seed in range(3):
        _save(tmp_path / f"good-{seed}", seed=seed)
    _save(tmp_path / "overflows", scale=1e20)
    model = load_model(model_dir)
    cache = AdapterCache(
        AdapterStore(tmp_path), model.config, LoraServingConfig(slots_per_class=(4, 1, 1, 1))
    )
    engine = Engine(model, cache, EngineConfig(max_batch_size=4, max_seq_len=64))
    rng = random.Random(0)
    try:
        for _ in range(12):
            adapters = ["good-0", "good-1", "good-2"] * 3 + ["overflows"] * 2
            rng.shuffle(adapters)
            requests = [
                GenerationRequest(
                    [rng.randrange(3, 200) for _ in range(rng.randint(3, 24))],
                    adapter_id=adapter,
                    max_new_tokens=rng.randint(2, 12),
                    stop_token_ids=[],
                )
                for adapter in adapters
            ]
            for result in engine.generate(requests):
                assert (result.status == "ok") == (result.adapter_id != "overflows"), result
    finally:
        engine.close()
