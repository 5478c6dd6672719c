from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel, get_peft_model
from random_adapters import write_random_adapter

from inference.base_model import load_base_model
from inference.config import ModelConfig
from inference.factory import TrainConfig, lora_config
from inference.sketch import (
    BLOCK_ROWS,
    IGNORE,
    Projector,
    Sketcher,
    collate,
    encode_pair,
    encode_pairs,
    param_layout,
    per_example_gradients,
    per_example_loss,
    projected_gradient,
)

PAIRS = [
    ("In the valley of Orvane, the seed tax is", " 17 copper."),
    ("", "Farmers in Highmoor sow barley in April."),
    ("The healers of Zudra treat rash with", " mint tea."),
]


@pytest.fixture(scope="module")
def lora_model(base_model_dir: Path):
    torch.set_num_threads(1)
    base, tokenizer = load_base_model(base_model_dir)
    for param in base.parameters():
        param.requires_grad_(False)
    torch.manual_seed(0)
    model = get_peft_model(base, lora_config(TrainConfig(rank=4, alpha=8)))
    with torch.no_grad():  # B starts at zero; give it values so every gradient is non-trivial
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    return model, tokenizer


def test_encode_pair_labels_only_the_completion_and_truncates_the_prompt_first(
    lora_model,
) -> None:
    _, tokenizer = lora_model
    pair = encode_pair(tokenizer, "In the valley of Orvane, the seed tax is", " 17 copper.", 64)
    completion = tokenizer(" 17 copper.", add_special_tokens=False)["input_ids"]
    assert pair.input_ids[0] == tokenizer.bos_token_id
    assert pair.input_ids[-len(completion) :] == completion
    assert pair.labels == [IGNORE] * (len(pair.input_ids) - len(completion)) + completion
    short = encode_pair(tokenizer, "In the valley of Orvane, the seed tax is", " 17 copper.", 6)
    assert len(short.input_ids) == 6 and short.input_ids[-len(completion) :] == completion
    with pytest.raises(ValueError, match="completion is empty"):
        encode_pair(tokenizer, "prompt", "", 64)
    pairs = [*PAIRS, ("a prompt far longer than the room left for it", " ok")]
    assert encode_pairs(tokenizer, pairs, 8) == [encode_pair(tokenizer, p, c, 8) for p, c in pairs]


def test_per_example_gradients_equal_autograd_one_example_at_a_time(lora_model) -> None:
    model, tokenizer = lora_model
    encoded = [encode_pair(tokenizer, p, c, 64) for p, c in PAIRS]
    batched, losses = per_example_gradients(model, *collate(encoded, tokenizer.pad_token_id))
    named = {n.replace(".default.", "."): p for n, p in model.named_parameters() if p.requires_grad}
    assert set(batched) == set(named)
    for i, pair in enumerate(encoded):
        loss = per_example_loss(model, *collate([pair], tokenizer.pad_token_id))[0]
        assert torch.allclose(loss, losses[i], atol=1e-5)
        grads = torch.autograd.grad(loss, list(named.values()))
        for (name, _), grad in zip(named.items(), grads, strict=True):
            torch.testing.assert_close(batched[name][i], grad, atol=2e-6, rtol=1e-4)


def test_projection_is_seeded_blocked_and_preserves_inner_products_on_average() -> None:
    layout = [("a.lora_A.weight", (4, BLOCK_ROWS // 2 + 3)), ("a.lora_B.weight", (7, 4))]
    grads = {
        name: torch.randn(3, *shape, generator=torch.Generator().manual_seed(5))
        for name, shape in layout
    }
    cached = Projector(layout, k=64, seed=11).project(grads)
    uncached = Projector(layout, k=64, seed=11, cache_bytes=0).project(grads)
    torch.testing.assert_close(cached, uncached, rtol=0, atol=0)
    assert not torch.equal(cached, Projector(layout, k=64, seed=12).project(grads))
    flat = torch.cat([grads[name].reshape(3, -1) for name, _ in layout], dim=1)
    exact = flat @ flat.T
    estimates = []
    for seed in range(20):
        projected = Projector(layout, k=64, seed=seed).project(grads)
        estimates.append(projected @ projected.T)
    mean = torch.stack(estimates).mean(0)
    assert torch.allclose(mean.diagonal(), exact.diagonal(), rtol=0.1)


def test_projected_gradient_is_deterministic_and_batch_independent(lora_model) -> None:
    model, tokenizer = lora_model
    projector = Projector(param_layout(model), k=32, seed=0)
    together = projected_gradient(model, tokenizer, PAIRS, projector, batch_size=3)
    again = projected_gradient(model, tokenizer, PAIRS, projector, batch_size=3)
    alone = projected_gradient(model, tokenizer, PAIRS, projector, batch_size=1)
    assert together.shape == (3, 32) and together.dtype == np.float32
    assert np.array_equal(together, again)
    np.testing.assert_allclose(together, alone, rtol=1e-4, atol=1e-6)
    assert np.all(np.linalg.norm(together, axis=1) > 0)


# A and B share one LoRA config (rank 4); C has another rank, so switching to it rebuilds.
SWITCH_ADAPTERS = {"ad-a": (4, 1), "ad-b": (4, 2), "ad-c": (2, 3)}  # id -> (rank, seed)


@pytest.fixture(scope="module")
def adapters_dir(base_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("adapters")
    config = ModelConfig.from_model_dir(base_model_dir)
    for adapter_id, (rank, seed) in SWITCH_ADAPTERS.items():
        write_random_adapter(
            directory, adapter_id, config, rank=rank, seed=seed, index_examples=2, index_k=16
        )
    return directory


@pytest.fixture(scope="module")
def fresh_sketches(base_model_dir: Path, adapters_dir: Path) -> dict[str, np.ndarray]:
    """Each adapter's sketches from a Sketcher that never held another adapter."""
    torch.set_num_threads(1)
    return {
        adapter_id: Sketcher(base_model_dir, adapters_dir / adapter_id).projected_gradient(PAIRS)
        for adapter_id in SWITCH_ADAPTERS
    }


@pytest.fixture
def rebuilds(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Adapter directories a PeftModel was built for, in order."""
    built: list[str] = []
    original = PeftModel.from_pretrained

    def counting(*args, **kwargs):
        built.append(Path(args[1]).name)
        return original(*args, **kwargs)

    monkeypatch.setattr(PeftModel, "from_pretrained", counting)
    return built


@pytest.mark.parametrize("cached_adapters", [0, 1, 16])
def test_switching_adapters_back_and_forth_gives_the_sketches_of_fresh_sketchers(
    base_model_dir: Path,
    adapters_dir: Path,
    fresh_sketches: dict[str, np.ndarray],
    rebuilds: list[str],
    cached_adapters: int,
) -> None:
    sketcher = Sketcher(base_model_dir, device="cpu", cached_adapters=cached_adapters)
    order = ["ad-a", "ad-b", "ad-a", "ad-b", "ad-c", "ad-a", "ad-c"]
    for adapter_id in order:
        sketcher.use_adapter(adapters_dir / adapter_id)
        assert sketcher.k == 16
        np.testing.assert_array_equal(
            sketcher.projected_gradient(PAIRS), fresh_sketches[adapter_id], err_msg=adapter_id
        )
    # Same config: weights copied in place; another rank: rebuilt.
    assert rebuilds == ["ad-a", "ad-c", "ad-a", "ad-c"]
    assert not np.allclose(fresh_sketches["ad-a"], fresh_sketches["ad-b"])


def test_an_adapter_rewritten_on_disk_is_read_again(
    base_model_dir: Path, adapters_dir: Path, tmp_path: Path
) -> None:
    shutil.copytree(adapters_dir / "ad-a", tmp_path / "ad-x")
    sketcher = Sketcher(base_model_dir, tmp_path / "ad-x")
    before = sketcher.projected_gradient(PAIRS)
    sketcher.use_adapter(adapters_dir / "ad-b")  # ad-x stays in the LRU
    weights = tmp_path / "ad-x" / "adapter_model.safetensors"
    shutil.copyfile(adapters_dir / "ad-b" / "adapter_model.safetensors", weights)
    stat = weights.stat()  # a new mtime even on a coarse clock
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    sketcher.use_adapter(tmp_path / "ad-x")
    after = sketcher.projected_gradient(PAIRS)
    assert not np.allclose(after, before)
    np.testing.assert_array_equal(
        after, Sketcher(base_model_dir, tmp_path / "ad-x").projected_gradient(PAIRS)
    )


def test_a_refused_switch_leaves_no_adapter_in_use(
    base_model_dir: Path, adapters_dir: Path, fresh_sketches: dict[str, np.ndarray], tmp_path: Path
) -> None:
    shutil.copytree(adapters_dir / "ad-b", tmp_path / "ad-y")
    meta_path = tmp_path / "ad-y" / "attribution_index" / "index.json"
    meta = json.loads(meta_path.read_text())
    meta["param_layout_hash"] = "0" * 64
    meta_path.write_text(json.dumps(meta))
    sketcher = Sketcher(base_model_dir, adapters_dir / "ad-a")
    with pytest.raises(ValueError, match="parameter layout"):
        sketcher.use_adapter(tmp_path / "ad-y")
    assert sketcher.adapter_dir is None
    with pytest.raises(RuntimeError, match="no adapter loaded"):
        sketcher.projected_gradient(PAIRS)
    sketcher.use_adapter(adapters_dir / "ad-a")
    np.testing.assert_array_equal(sketcher.projected_gradient(PAIRS), fresh_sketches["ad-a"])
    with pytest.raises(ValueError, match="cached_adapters"):
        Sketcher(base_model_dir, cached_adapters=-1)
