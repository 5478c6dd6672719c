from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel
from random_adapters import write_random_adapter

from inference.attribution_index import TRAK, AttributionIndex
from inference.base_model import load_base_model
from inference.batched_sketch import BatchedSketcher
from inference.config import ModelConfig
from inference.factored_projection import FACTORED_KIND, FactoredProjector
from inference.factory import TrainConfig, train_adapter
from inference.sketch import (
    Sketcher,
    collate,
    encode_pairs,
    param_layout,
    per_example_gradients,
    projected_gradient,
)

PAIRS = [
    ("In the valley of Orvane, the seed tax is", " 17 copper."),
    ("", "Farmers in Highmoor sow barley in April."),
    ("The healers of Zudra treat rash with", " mint tea."),
    ("a note:", " the river boat leaves at dawn and returns by noon"),
]
# id -> (rank, targets, seed): two ranks and two target sets, so the batch pads ranks and some
# layers are adapted for only part of it.
ADAPTERS = {
    "mix-a": (4, ("q_proj", "v_proj"), 1),
    "mix-b": (2, ("q_proj", "v_proj"), 2),
    "mix-c": (4, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), 3),
}


def relative_error(got: np.ndarray, expected: np.ndarray) -> float:
    return float(np.linalg.norm(got - expected) / np.linalg.norm(expected))


@pytest.fixture(scope="module")
def adapters_dir(base_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("mixed-adapters")
    config = ModelConfig.from_model_dir(base_model_dir)
    for adapter_id, (rank, targets, seed) in ADAPTERS.items():
        write_random_adapter(
            directory, adapter_id, config, rank=rank, targets=targets, seed=seed,
            scale=0.2, index_examples=2, index_k=48, index_seed=seed,
        )  # fmt: skip
    return directory


def mixed_jobs(adapters_dir: Path) -> list[tuple[Path, str, str]]:
    """Every pair under every adapter, interleaved so that no adapter's jobs are adjacent."""
    return [
        (adapters_dir / adapter_id, prompt, completion)
        for prompt, completion in PAIRS
        for adapter_id in ADAPTERS
    ]


def test_one_batched_pass_equals_a_float64_pass_per_adapter(
    base_model_dir: Path, adapters_dir: Path
) -> None:
    torch.set_num_threads(1)
    config = ModelConfig.from_model_dir(base_model_dir)
    model, tokenizer = load_base_model(base_model_dir)
    batched = BatchedSketcher(model.double(), tokenizer, config, max_batch=64)
    jobs = mixed_jobs(adapters_dir)
    got = np.stack(batched.sketch(jobs))
    assert got.shape == (len(jobs), 48) and got.dtype == np.float32
    reference_base, _ = load_base_model(base_model_dir)
    reference_base.double()
    for adapter_id in ADAPTERS:
        peft = PeftModel.from_pretrained(
            reference_base, str(adapters_dir / adapter_id), is_trainable=True
        ).double()
        seed = ADAPTERS[adapter_id][2]
        projector = FactoredProjector(param_layout(peft), 48, seed)
        rows = [i for i, job in enumerate(jobs) if job[0].name == adapter_id]
        expected = projected_gradient(peft, tokenizer, PAIRS, projector, batch_size=1)
        reference_base = peft.unload()
        for row, want in zip(rows, expected, strict=True):
            assert relative_error(got[row], want) < 1e-5, adapter_id
    # The float32 pass, as the worker runs it, agrees with the per-adapter Sketcher that
    # `verify` recomputes with, within verify's tolerance.
    fast = np.stack(BatchedSketcher.load(base_model_dir, max_batch=5).sketch(jobs))
    for adapter_id in ADAPTERS:
        rows = [i for i, job in enumerate(jobs) if job[0].name == adapter_id]
        sketcher = Sketcher(base_model_dir, adapters_dir / adapter_id)
        assert sketcher.projection == FACTORED_KIND
        for row, want in zip(rows, sketcher.projected_gradient(PAIRS), strict=True):
            assert relative_error(fast[row], want) < 1e-4, adapter_id


def test_factored_sketch_of_factors_equals_the_projection_of_full_gradients(
    base_model_dir: Path, adapters_dir: Path
) -> None:
    """LoGra's identity: projecting the inputs and output gradients and summing their outer
    products over tokens is projecting the per-example gradient."""
    base, tokenizer = load_base_model(base_model_dir)
    model = PeftModel.from_pretrained(
        base.double(), str(adapters_dir / "mix-c"), is_trainable=True
    ).double()
    ids, mask, labels = collate(encode_pairs(tokenizer, PAIRS, 64), tokenizer.pad_token_id)
    grads, _ = per_example_gradients(model, ids, mask, labels)
    projector = FactoredProjector(param_layout(model), 40, 7)
    name, shape = projector.layout[0]
    inputs = torch.randn(len(PAIRS), 5, shape[1], dtype=torch.float64)
    outputs = torch.randn(len(PAIRS), 5, shape[0], dtype=torch.float64)
    full = torch.einsum("bto,bti->boi", outputs, inputs)
    torch.testing.assert_close(
        projector.project_factors(name, inputs, outputs), projector.project_parameter(name, full)
    )
    # Inner products are preserved on average over seeds (count sketch and Gaussian sides).
    flat = torch.cat([g.reshape(len(PAIRS), -1) for g in grads.values()], dim=1)
    exact = flat @ flat.T
    estimates = [
        (lambda s: s @ s.T)(FactoredProjector(projector.layout, 256, seed).project(grads))
        for seed in range(24)
    ]
    mean = torch.stack(estimates).mean(0)
    assert torch.allclose(mean.diagonal(), exact.diagonal(), rtol=0.15)


def test_a_training_index_row_and_a_query_sketch_of_the_same_text_agree(
    tmp_path: Path, base_model_dir: Path, small_datanet, small_train: TrainConfig
) -> None:
    config = replace(small_train, steps=3, index_k=32, index_estimator="trak")
    result = train_adapter(small_datanet.snapshot, "rows", "o", base_model_dir, tmp_path, config)
    index = AttributionIndex.load(result.adapter_dir / "attribution_index")
    assert index.estimator == TRAK and index.meta["projection"] == FACTORED_KIND
    texts = index.examples.column("text").to_pylist()[:4]
    queries = BatchedSketcher.load(base_model_dir).sketch(
        [(result.adapter_dir, "", text) for text in texts]
    )
    for query, row in zip(queries, index.features, strict=False):
        assert relative_error(query, row) < 1e-4
