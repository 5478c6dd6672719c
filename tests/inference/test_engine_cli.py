"""`loraledger generate`: one request through the engine from the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from multi_lora_fixtures import save_tiny_llama
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from tokenizers.processors import TemplateProcessing
from typer.testing import CliRunner

from inference.adapters import save_peft_adapter
from inference.config import ModelConfig
from loraledger.cli import app

TINY = ModelConfig.from_preset("tiny")


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("home")
    model_dir = save_tiny_llama(home / "base-model")
    tokenizer = Tokenizer(WordLevel({f"w{i}": i for i in range(256)}, unk_token="w0"))
    tokenizer.pre_tokenizer = Whitespace()
    # The tokenizer's own rules put its BOS ("w1") before every prompt; nothing else adds one.
    tokenizer.post_processor = TemplateProcessing(single="w1 $A", special_tokens=[("w1", 1)])
    tokenizer.save(str(model_dir / "tokenizer.json"))
    generator = torch.Generator().manual_seed(0)
    modules = {}
    for layer in range(TINY.num_layers):
        for target in ("q_proj", "v_proj"):
            in_features, out_features = TINY.projection_shape(target)
            modules[(layer, target)] = (
                torch.randn(8, in_features, generator=generator),
                torch.randn(out_features, 8, generator=generator),
            )
    save_peft_adapter(home / "adapters" / "demo-adapter", modules, lora_alpha=16)
    return home


def _run(home: Path, *args: str):
    env = {"LORALEDGER_HOME": str(home), "LORALEDGER_BASE_MODEL": str(home / "base-model")}
    return CliRunner().invoke(app, ["generate", *args], env=env)


def test_generate_with_an_adapter_and_without(home: Path) -> None:
    common = ["--prompt", "w5 w9 w77", "--max-new-tokens", "5", "--json"]
    with_adapter = _run(home, "--adapter", "demo-adapter", *common)
    assert with_adapter.exit_code == 0, with_adapter.output
    result = json.loads(with_adapter.output)
    assert result["status"] == "ok" and result["cache_tier"] == "disk"
    assert result["usage"] == {"prompt_tokens": 4, "completion_tokens": 5}  # bos + 3 words
    assert result["prompt_token_ids"] == [1, 5, 9, 77]
    assert len(result["adapter_hash"]) == 64 and len(result["base_model_hash"]) == 64
    base = json.loads(_run(home, "--adapter", "none", *common).output)
    assert base["adapter_hash"] is None and base["cache_tier"] == "none"
    assert base["output_token_ids"] != result["output_token_ids"]


def test_same_seed_same_text(home: Path) -> None:
    args = ["--prompt", "w1 w2", "--temperature", "1.0", "--top-p", "0.9", "--seed", "7"]
    first, second = _run(home, *args), _run(home, *args)
    assert first.exit_code == 0, first.output
    assert first.output.splitlines()[0] == second.output.splitlines()[0]


def test_unknown_adapter_fails_with_one_line(home: Path) -> None:
    outcome = _run(home, "--adapter", "nobody", "--prompt", "w1")
    assert outcome.exit_code == 1
    assert "unknown_adapter: no adapter 'nobody'" in outcome.output


def test_missing_model_directory_is_reported(home: Path, tmp_path: Path) -> None:
    outcome = _run(home, "--prompt", "w1", "--model-dir", str(tmp_path))
    assert outcome.exit_code == 1 and "no model checkpoint in" in outcome.output


def test_an_invalid_adapter_id_is_refused_before_anything_loads(home: Path, tmp_path: Path) -> None:
    outcome = _run(home, "--adapter", "../adapters/demo-adapter", "--prompt", "w1",
                   "--model-dir", str(tmp_path))  # no model there: the id is checked first
    assert outcome.exit_code == 1
    assert "invalid adapter id '../adapters/demo-adapter'" in outcome.output


def test_chat_needs_a_chat_template(home: Path) -> None:
    outcome = _run(home, "--prompt", "w1 w2", "--chat")
    assert outcome.exit_code == 1
    assert "the base model has no chat template: drop --chat" in outcome.output
