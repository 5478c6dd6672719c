from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from transformers import LlamaForCausalLM

from inference.base_model import (
    BUILD_MARKER,
    build_base_model,
    built_here,
    cache_key,
    load_base_model,
    preset,
)
from inference.hashing import base_model_hash


def test_the_test_preset_is_a_loadable_llama_checkpoint(base_model_dir: Path) -> None:
    model, tokenizer = load_base_model(base_model_dir)
    assert isinstance(model, LlamaForCausalLM)
    assert (base_model_dir / "tokenizer.json").is_file()
    assert (base_model_dir / "tokenizer_config.json").is_file()
    assert not list(base_model_dir.glob("*.bin"))
    assert {tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token} == {
        "<pad>",
        "<s>",
        "</s>",
    }
    config = json.loads((base_model_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and config["vocab_size"] == len(tokenizer)
    assert built_here(base_model_dir)["key"] == cache_key(preset("test"), 0)


def test_builds_are_deterministic_and_cached(tmp_path: Path, base_model_dir: Path) -> None:
    info = build_base_model(tmp_path / "model", tmp_path / "cache", "test", seed=0)
    assert info.source == "built"
    assert info.weights_hash == base_model_hash(base_model_dir)  # a separate build, same bytes
    cached = tmp_path / "cache" / f"base-model-{info.key}"
    assert base_model_hash(cached) == info.weights_hash
    assert build_base_model(tmp_path / "model", tmp_path / "cache", "test").source == "up-to-date"
    shutil.rmtree(tmp_path / "model")
    again = build_base_model(tmp_path / "model", tmp_path / "cache", "test")
    assert (again.source, again.weights_hash) == ("cache", info.weights_hash)


def test_a_real_checkpoint_is_used_as_is_and_never_overwritten(
    tmp_path: Path, base_model_dir: Path
) -> None:
    external = tmp_path / "real-model"
    shutil.copytree(base_model_dir, external)
    (external / BUILD_MARKER).unlink()
    info = build_base_model(external, tmp_path / "cache", "test")
    assert (info.source, info.key) == ("external", None)
    with pytest.raises(FileExistsError, match="not built by loraledger"):
        build_base_model(external, tmp_path / "cache", "test", force=True)
    assert not (tmp_path / "cache").exists()


def test_unknown_preset_and_missing_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(KeyError, match="unknown base model preset"):
        build_base_model(tmp_path / "m", tmp_path / "c", "huge")
    with pytest.raises(FileNotFoundError, match="base-model build"):
        load_base_model(tmp_path / "nothing")


def test_base_model_build_command_uses_the_cache(tmp_path: Path, base_model_dir: Path) -> None:
    from typer.testing import CliRunner

    from loraledger.cli import app

    env = {
        "LORALEDGER_HOME": str(tmp_path / "home"),
        "LORALEDGER_BASE_MODEL": str(tmp_path / "model"),
        "LORALEDGER_CACHE": str(base_model_dir.parent / "cache"),  # the session's build
    }
    result = CliRunner().invoke(app, ["base-model", "build", "--preset", "test"], env=env)
    assert result.exit_code == 0, result.output
    assert "base model (cache)" in result.output
    assert base_model_hash(tmp_path / "model") == base_model_hash(base_model_dir)
    result = CliRunner().invoke(app, ["base-model", "build", "--preset", "nope"], env=env)
    assert result.exit_code == 1 and "unknown preset" in result.output
