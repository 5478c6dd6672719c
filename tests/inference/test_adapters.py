"""Reading PEFT adapters: what loads unchanged, and every refusal with its one-line reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from adapter_manifests import write_manifest
from multi_lora_fixtures import (
    AdapterRecipe,
    load_hf,
    save_peft_adapter_with_peft,
    save_tiny_llama,
)
from peft import PeftModel
from safetensors.torch import load_file, save_file

from inference.adapter_store import AdapterDir, AdapterRefused, UnknownAdapter
from inference.adapters import load_peft_adapter, save_peft_adapter
from inference.config import ModelConfig

TINY = ModelConfig.from_preset("tiny")
BASE_HASH = "a" * 64


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("base") / "llama")


@pytest.fixture(scope="module")
def peft_dir(base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    recipe = AdapterRecipe("made-by-peft", r=8, lora_alpha=32, target_modules=["q_proj", "v_proj"])
    return save_peft_adapter_with_peft(base_dir, tmp_path_factory.mktemp("store"), recipe)


def _copy(source: Path, target: Path) -> Path:
    target.mkdir(parents=True)
    for path in source.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    return target


def _load(adapter_dir: Path, **kwargs) -> None:
    load_peft_adapter(adapter_dir, TINY, max_rank=kwargs.pop("max_rank", 64), **kwargs)


def _random_modules(rank: int, targets: tuple[str, ...], layers: int = 2) -> dict:
    modules = {}
    for layer in range(layers):
        for target in targets:
            in_features, out_features = TINY.projection_shape(target)
            modules[(layer, target)] = (
                torch.randn(rank, in_features),
                torch.randn(out_features, rank),
            )
    return modules


def test_peft_adapter_loads_with_its_keys_ranks_and_scales(peft_dir: Path) -> None:
    weights = load_peft_adapter(peft_dir, TINY, max_rank=64)
    assert set(weights.modules) == {(i, t) for i in (0, 1) for t in ("q_proj", "v_proj")}
    assert weights.rank == 8
    assert weights.version == AdapterDir(peft_dir).adapter_hash()
    module = weights.modules[(1, "v_proj")]
    assert module.scale == 32 / 8
    stored = load_file(AdapterDir(peft_dir).weights_path)
    torch.testing.assert_close(
        module.b, stored["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"]
    )


def test_adapter_written_here_loads_in_peft(base_dir: Path, tmp_path: Path) -> None:
    modules = _random_modules(4, ("q_proj", "down_proj"))
    version = save_peft_adapter(tmp_path / "ours", modules, lora_alpha=8)
    assert version == AdapterDir(tmp_path / "ours").adapter_hash()
    peft = PeftModel.from_pretrained(load_hf(base_dir), tmp_path / "ours")
    lora_b = peft.base_model.model.model.layers[1].mlp.down_proj.lora_B["default"].weight
    torch.testing.assert_close(lora_b, modules[(1, "down_proj")][1])
    assert peft.base_model.model.model.layers[0].self_attn.q_proj.scaling["default"] == 2.0


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        ({"use_dora": True}, "uses DoRA"),
        ({"bias": "lora_only"}, "trains biases"),
        ({"modules_to_save": ["lm_head"]}, "saves full modules"),
        ({"peft_type": "IA3"}, "is a IA3 adapter"),
        ({"fan_in_fan_out": True}, "fan_in_fan_out"),
        ({"r": 4}, "declares r=4 for layers.0.self_attn.q_proj but its weights have rank 8"),
    ],
)
def test_unsupported_peft_options_are_refused(
    peft_dir: Path, tmp_path: Path, edit: dict, reason: str
) -> None:
    adapter = AdapterDir(_copy(peft_dir, tmp_path / "edited"))
    config = json.loads(adapter.config_path.read_text())
    adapter.config_path.write_text(json.dumps({**config, **edit}))
    with pytest.raises(AdapterRefused, match=reason):
        _load(adapter.path)


def _edit_weights(peft_dir: Path, tmp_path: Path, change) -> Path:
    adapter = AdapterDir(_copy(peft_dir, tmp_path / "edited"))
    tensors = load_file(adapter.weights_path)
    change(tensors)
    save_file(tensors, adapter.weights_path)
    return adapter.path


def test_adapter_for_another_base_shape_is_refused(tmp_path: Path) -> None:
    wide = ModelConfig.from_hf_config({**TINY.to_hf_config(), "hidden_size": 128, "head_dim": 32})
    modules = {}
    for target in ("q_proj", "v_proj"):
        in_features, out_features = wide.projection_shape(target)
        modules[(0, target)] = (torch.randn(8, in_features), torch.randn(out_features, 8))
    save_peft_adapter(tmp_path / "wide", modules, lora_alpha=8)
    with pytest.raises(AdapterRefused, match=r"shapes A\(8, 128\).*trained for another base"):
        _load(tmp_path / "wide")


def test_adapter_for_a_deeper_base_is_refused(tmp_path: Path) -> None:
    save_peft_adapter(tmp_path / "deep", _random_modules(4, ("q_proj",), layers=3), lora_alpha=8)
    with pytest.raises(AdapterRefused, match="adapts layer 2 but the base model has 2 layers"):
        _load(tmp_path / "deep")


def test_rank_above_the_maximum_is_refused(tmp_path: Path) -> None:
    save_peft_adapter(tmp_path / "big", _random_modules(32, ("q_proj",)), lora_alpha=8)
    with pytest.raises(AdapterRefused, match="rank 32 on layers.0.self_attn.q_proj, above the max"):
        _load(tmp_path / "big", max_rank=16)


def test_unknown_target_module_is_refused(peft_dir: Path, tmp_path: Path) -> None:
    def add_embedding_lora(tensors: dict) -> None:
        tensors["base_model.model.model.embed_tokens.lora_embedding_A"] = torch.zeros(8, 256)

    adapter = _edit_weights(peft_dir, tmp_path, add_embedding_lora)
    with pytest.raises(AdapterRefused, match="unknown module: .*embed_tokens"):
        _load(adapter)


def test_target_outside_the_served_set_is_refused(peft_dir: Path) -> None:
    with pytest.raises(AdapterRefused, match="targets self_attn.v_proj, which this server does"):
        _load(peft_dir, target_modules=("q_proj", "k_proj"))


def test_non_finite_weights_are_refused(peft_dir: Path, tmp_path: Path) -> None:
    def poison(tensors: dict) -> None:
        key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
        tensors[key][3, 1] = float("nan")

    with pytest.raises(AdapterRefused, match="non-finite weights in layers.0.self_attn.q_proj"):
        _load(_edit_weights(peft_dir, tmp_path, poison))


def test_half_a_lora_pair_is_refused(peft_dir: Path, tmp_path: Path) -> None:
    def drop_b(tensors: dict) -> None:
        del tensors["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"]

    with pytest.raises(AdapterRefused, match="lora_A without lora_B"):
        _load(_edit_weights(peft_dir, tmp_path, drop_b))


def test_manifest_pins_weights_and_base(peft_dir: Path, tmp_path: Path) -> None:
    adapter = _copy(peft_dir, tmp_path / "pinned")
    write_manifest(adapter, base_model_hash=BASE_HASH)
    _load(adapter, base_model_hash=BASE_HASH)

    write_manifest(adapter, base_model_hash="b" * 64)
    with pytest.raises(AdapterRefused, match="trained on base model bbbbbbbbbbbb"):
        _load(adapter, base_model_hash=BASE_HASH)

    write_manifest(adapter, base_model_hash=BASE_HASH, weights_hash="c" * 64)
    with pytest.raises(AdapterRefused, match="the weights were changed or corrupted"):
        _load(adapter, base_model_hash=BASE_HASH)

    AdapterDir(adapter).manifest_path.write_text('{"weights_hash": "' + "c" * 64 + '"}')
    with pytest.raises(AdapterRefused, match="invalid manifest.json: adapter_id: Field required"):
        _load(adapter)


def test_a_directory_without_peft_files_is_unknown(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(UnknownAdapter, match="needs adapter_config.json and adapter_model"):
        _load(tmp_path / "empty")


def test_corrupt_weights_file_is_refused(peft_dir: Path, tmp_path: Path) -> None:
    adapter = _copy(peft_dir, tmp_path / "corrupt")
    AdapterDir(adapter).weights_path.write_bytes(b"not a safetensors file")
    with pytest.raises(AdapterRefused, match="is unreadable"):
        _load(adapter)
