"""`loraledger base-model import` of a Hugging Face directory, and the sources it refuses with
one line saying what to do. (GGUF conversion of a real checkpoint: test_real_checkpoint.py.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import pytest
import torch
from typer.testing import CliRunner

from inference.checkpoint_import import ImportRefused, import_checkpoint
from inference.hashing import base_model_hash
from inference.model import load_model
from loraledger.cli import app


def _import_cli(home: Path, source: Path):
    env = {
        "LORALEDGER_HOME": str(home),
        "LORALEDGER_BASE_MODEL": str(home / "base-model"),
        "LORALEDGER_CACHE": str(home / "cache"),
    }
    return CliRunner().invoke(app, ["base-model", "import", str(source)], env=env)


def test_a_checkpoint_directory_installs_with_its_tokenizer(
    base_model_dir: Path, tmp_path: Path
) -> None:
    (tmp_path / "base-model").mkdir()
    (tmp_path / "base-model" / "stale.safetensors").write_bytes(b"from the previous model")
    imported = _import_cli(tmp_path, base_model_dir)
    assert imported.exit_code == 0, imported.output
    installed = tmp_path / "base-model"
    weights_hash = base_model_hash(base_model_dir)
    parameters = sum(p.numel() for p in load_model(base_model_dir).parameters())
    assert imported.output.strip().splitlines()[-1].startswith(
        f"base model: LlamaForCausalLM, {parameters:,} parameters, weights {weights_hash}, "
        "chat template no (safetensors)"
    )
    assert base_model_hash(installed) == weights_hash
    assert not (installed / "stale.safetensors").exists()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (installed / name).read_bytes() == (base_model_dir / name).read_bytes()


def test_pickle_checkpoints_are_refused(base_model_dir: Path, tmp_path: Path) -> None:
    source = tmp_path / "pickled"
    source.mkdir()
    shutil.copy(base_model_dir / "config.json", source)
    torch.save({"w": torch.zeros(1)}, source / "pytorch_model.bin")
    for path in (source, source / "pytorch_model.bin"):
        with pytest.raises(ImportRefused, match="pickle weights, which loraledger never loads"):
            import_checkpoint(path, tmp_path / "base-model", tmp_path / "cache")
    refused = _import_cli(tmp_path, source)
    assert refused.exit_code == 1 and "convert them to safetensors" in refused.output
    assert not (tmp_path / "base-model").exists()


def test_unsupported_architectures_are_refused(base_model_dir: Path, tmp_path: Path) -> None:
    source = tmp_path / "gpt2"
    shutil.copytree(base_model_dir, source)
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(ImportRefused, match="'gpt2' model; loraledger serves Llama, Mistral or"):
        import_checkpoint(source, tmp_path / "base-model", tmp_path / "cache")
    writer = gguf.GGUFWriter(tmp_path / "model.gguf", "gpt2")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ImportRefused, match="'gpt2' model; loraledger serves"):
        import_checkpoint(tmp_path / "model.gguf", tmp_path / "base-model", tmp_path / "cache")


def test_a_checkpoint_that_does_not_load_leaves_the_base_model_alone(
    base_model_dir: Path, tmp_path: Path
) -> None:
    installed = tmp_path / "base-model"
    import_checkpoint(base_model_dir, installed, tmp_path / "cache")
    source = tmp_path / "broken"
    shutil.copytree(base_model_dir, source)
    config = json.loads((source / "config.json").read_text())
    config["num_hidden_layers"] += 1
    (source / "config.json").write_text(json.dumps(config))
    with pytest.raises(ImportRefused, match="lacks"):
        import_checkpoint(source, installed, tmp_path / "cache")
    (source / "tokenizer.json").unlink()
    with pytest.raises(ImportRefused, match="no tokenizer.json"):
        import_checkpoint(source, installed, tmp_path / "cache")
    with pytest.raises(ImportRefused, match="neither a checkpoint directory nor a .gguf"):
        import_checkpoint(source / "config.json", installed, tmp_path / "cache")
    assert base_model_hash(installed) == base_model_hash(base_model_dir)
