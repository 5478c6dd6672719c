from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel

from inference.attribution_index import (
    EKFAC_PROJECTED,
    INDEX_FILES,
    TRAK,
    AttributionIndex,
    IndexExample,
    preconditioner,
    write_index,
)
from inference.base_model import load_base_model
from inference.factory import TrainConfig, train_adapter
from inference.influence_preconditioner import (
    ekfac_projected_features,
    fit_factors,
    projected_hessian,
    query_like_pairs,
    solve_projected,
)
from inference.sketch import (
    PROJECTION_KIND,
    PROJECTION_KINDS,
    Sketcher,
    collate,
    encode_pairs,
    lora_layers,
    make_projector,
    param_layout,
    per_example_gradients,
    projected_gradient,
)


@pytest.fixture(scope="module")
def sketcher(base_model_dir: Path, trained_adapter) -> Sketcher:
    return Sketcher(base_model_dir, trained_adapter.adapter_dir)


def test_index_files_hash_and_layout(trained_adapter, small_datanet) -> None:
    directory = trained_adapter.adapter_dir / "attribution_index"
    assert sorted(p.name for p in directory.iterdir()) == sorted(INDEX_FILES)
    index = AttributionIndex.load(directory, expected_hash=trained_adapter.manifest.index_hash)
    rows = small_datanet.snapshot.rows
    assert index.features.shape == (len(rows), index.k) and index.features.dtype == np.float32
    assert index.examples.column("row_id").to_pylist() == [r.row_id for r in rows]
    assert index.examples.column("contributor_id").to_pylist() == [r.contributor_id for r in rows]
    assert set(index.examples.column("datanet_id").to_pylist()) == {"commons"}
    meta = json.loads((directory / "index.json").read_text())
    assert {"k", "seed", "projection", "loss", "param_layout_hash", "estimator"} <= set(meta)
    assert index.estimator == EKFAC_PROJECTED and index.preconditioner is None
    assert meta["estimator_params"] == {
        "damping_relative": TrainConfig().index_damping_relative,
        "prior_damping_relative": TrainConfig().index_prior_damping_relative,
    }


def test_an_altered_index_is_refused(tmp_path: Path, trained_adapter) -> None:
    copy = tmp_path / "index"
    shutil.copytree(trained_adapter.adapter_dir / "attribution_index", copy)
    meta = json.loads((copy / "index.json").read_text())
    meta["estimator_params"]["damping_relative"] *= 2
    (copy / "index.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="hash"):
        AttributionIndex.load(copy, expected_hash=trained_adapter.manifest.index_hash)
    assert AttributionIndex.load(copy).hash != trained_adapter.manifest.index_hash


def test_score_is_the_dot_product_with_the_stored_rows(trained_adapter) -> None:
    index = AttributionIndex.load(trained_adapter.adapter_dir / "attribution_index")
    queries = np.random.default_rng(0).standard_normal((3, index.k)).astype(np.float32)
    expected = queries.astype(np.float64) @ index.features.astype(np.float64).T
    np.testing.assert_allclose(index.score(queries), expected, rtol=1e-9)
    np.testing.assert_allclose(index.score(queries[0]), index.score(queries)[0], rtol=1e-12)
    with pytest.raises(ValueError, match="shape"):
        index.score(np.zeros(index.k + 1, dtype=np.float32))


def _write_random_index(directory: Path, estimator: tuple[str, str]) -> np.ndarray:
    features = np.random.default_rng(1).standard_normal((6, 8)).astype(np.float32)
    write_index(
        directory,
        features,
        [IndexExample(i, f"row-{i}", "c", "d", f"text {i}") for i in range(6)],
        seed=0,
        projection="p",
        loss="l",
        param_layout_hash="0" * 64,
        max_length=16,
        lambda_relative=0.5,
        estimator=estimator,
    )
    return features


def test_a_trak_index_still_scores_with_its_preconditioner(tmp_path: Path) -> None:
    features = _write_random_index(tmp_path, TRAK)
    index = AttributionIndex.load(tmp_path)
    meta = json.loads((tmp_path / "index.json").read_text())
    assert index.estimator == TRAK and "estimator_params" not in meta
    expected, lam = preconditioner(features, 0.5)
    assert lam == pytest.approx(meta["lambda"])
    np.testing.assert_allclose(index.preconditioner, expected, rtol=1e-5, atol=1e-8)
    query = np.random.default_rng(2).standard_normal(8)
    p64, f64 = index.preconditioner.astype(np.float64), features.astype(np.float64)
    np.testing.assert_allclose(index.score(query), query @ p64 @ f64.T, rtol=1e-9)


def test_an_index_of_an_unknown_estimator_is_refused(tmp_path: Path) -> None:
    _write_random_index(tmp_path, EKFAC_PROJECTED)
    meta = json.loads((tmp_path / "index.json").read_text())
    meta["estimator_version"] = "9"
    (tmp_path / "index.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="'ekfac-projected' version '9'.*re-index"):
        AttributionIndex.load(tmp_path)
    with pytest.raises(ValueError, match="unknown estimator"):
        _write_random_index(tmp_path, ("ekfac-projected", "9"))


@pytest.fixture(scope="module")
def peft_model(base_model_dir: Path, trained_adapter):
    torch.set_num_threads(1)
    base, tokenizer = load_base_model(base_model_dir)
    model = PeftModel.from_pretrained(
        base, str(trained_adapter.adapter_dir), is_trainable=True, use_safetensors=True
    )
    model.eval()
    return model, tokenizer


@pytest.mark.parametrize("kind", PROJECTION_KINDS)
def test_ekfac_factors_and_projected_hessian_match_explicit_matrices(
    peft_model, small_datanet, kind: str
) -> None:
    model, tokenizer = peft_model
    pairs = [("", row.text) for row in small_datanet.snapshot.rows[:10]]
    layers = lora_layers(model)
    factors = fit_factors(model, tokenizer, pairs, 64, 4, 0.05, layers)
    ids, mask, labels = collate(encode_pairs(tokenizer, pairs, 64), tokenizer.eos_token_id)
    grads, _ = per_example_gradients(model, ids, mask, labels, layers)
    layout = param_layout(model)[:4]  # a few layers keep the explicit matrices small
    projector = make_projector(kind, layout, 48, 3)
    expected = np.zeros((48, 48))
    for name, shape in layout:
        f = factors[name]
        # The corrected eigenvalues: the examples' mean squared gradient in the eigenbasis.
        rotated = f.output_basis.T @ grads[name].double() @ f.input_basis
        corrected = (rotated**2).mean(dim=0)
        damping = 0.05 * float(corrected.mean())
        torch.testing.assert_close(f.eigenvalues, corrected + damping, rtol=1e-4, atol=1e-12)
        size = shape[0] * shape[1]
        matrix = projector.project(
            {
                n: torch.zeros(size, *s) if n != name else torch.eye(size).view(size, *s)
                for n, s in layout
            }
        ).double()  # this layer's columns of R, transposed: [size, k]
        basis = torch.kron(f.output_basis, f.input_basis)
        hessian = basis @ torch.diag(f.eigenvalues.reshape(-1)) @ basis.T
        expected += (matrix.T @ hessian @ matrix).numpy()
    # The projection runs in float32, so entries agree to float32 rounding of the largest.
    np.testing.assert_allclose(
        projected_hessian(projector, factors), expected, atol=1e-5 * np.abs(expected).max()
    )


def test_the_index_rows_are_the_ekfac_projected_estimator(
    peft_model, trained_adapter, sketcher: Sketcher
) -> None:
    model, tokenizer = peft_model
    index = AttributionIndex.load(trained_adapter.adapter_dir / "attribution_index")
    params = index.meta["estimator_params"]
    texts = index.examples.column("text").to_pylist()
    layers = lora_layers(model)
    assert index.meta["projection"] == PROJECTION_KIND
    projector = make_projector(PROJECTION_KIND, param_layout(model), index.k, index.meta["seed"])
    again = ekfac_projected_features(
        model, tokenizer, texts, projector, 64, 32,
        params["damping_relative"], params["prior_damping_relative"], layers,
    )  # fmt: skip
    np.testing.assert_allclose(
        again, index.features, rtol=1e-3, atol=1e-3 * np.abs(index.features).max()
    )
    # The worker's sketches use the index's projection.
    sketches = projected_gradient(model, tokenizer, [("", t) for t in texts[:5]], projector)
    np.testing.assert_allclose(
        sketcher.projected_gradient([("", t) for t in texts[:5]]), sketches, rtol=1e-4, atol=1e-6
    )


def test_with_the_prior_equal_to_h_the_rows_solve_r_h_rt_w_equals_the_sketch(
    peft_model, small_datanet
) -> None:
    model, tokenizer = peft_model
    texts = [row.text for row in small_datanet.snapshot.rows[:8]]
    layers = lora_layers(model)
    projector = make_projector(PROJECTION_KIND, param_layout(model), 40, 5)
    factors = fit_factors(model, tokenizer, [("", t) for t in texts], 64, 4, 0.05, layers)
    hessian = projected_hessian(projector, factors)
    sketches = projected_gradient(model, tokenizer, [("", t) for t in texts], projector)
    rows = solve_projected(hessian, sketches)
    residual = rows.astype(np.float64) @ hessian - sketches
    assert np.abs(residual).max() <= 1e-3 * np.abs(sketches).max()


def test_query_like_pairs_cut_texts_at_word_boundaries() -> None:
    pairs = query_like_pairs(["a b c d", "one", "x y"])
    assert pairs == [("a b", " c d"), ("a b c", " d"), ("", "one"), ("x", " y")]
    assert all(prompt + completion in {"a b c d", "one", "x y"} for prompt, completion in pairs)


def test_planted_facts_are_attributed_to_their_contributor(
    sketcher: Sketcher, trained_adapter, small_datanet
) -> None:
    index = AttributionIndex.load(trained_adapter.adapter_dir / "attribution_index")
    facts = small_datanet.synthetic.facts
    scores = index.score(sketcher.projected_gradient([(f.prompt, f.completion) for f in facts]))
    contributors = index.examples.column("contributor_id").to_pylist()
    top = [contributors[int(np.argmax(row))] for row in scores]
    hits = sum(t == f.contributor_id for t, f in zip(top, facts, strict=True))
    assert hits >= 0.8 * len(facts), f"{hits}/{len(facts)} planted facts attributed correctly"


def test_sketcher_swaps_adapters(
    sketcher: Sketcher,
    trained_adapter,
    small_datanet,
    base_model_dir: Path,
    tmp_path: Path,
    small_train: TrainConfig,
) -> None:
    pair = [("In the valley of Orvane, the seed tax is", " 17 copper.")]
    before = sketcher.projected_gradient(pair)
    config = replace(small_train, steps=3, seed=5)
    other = train_adapter(small_datanet.snapshot, "other", "o", base_model_dir, tmp_path, config)
    sketcher.use_adapter(other.adapter_dir)
    assert not np.allclose(sketcher.projected_gradient(pair), before)
    sketcher.use_adapter(trained_adapter.adapter_dir)
    np.testing.assert_array_equal(sketcher.projected_gradient(pair), before)


def test_sketcher_refuses_an_index_of_another_method(
    sketcher: Sketcher, trained_adapter, tmp_path: Path
) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(trained_adapter.adapter_dir, copy)
    meta_path = copy / "attribution_index" / "index.json"
    meta = json.loads(meta_path.read_text())
    meta["projection"] = "rademacher-v9"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="rademacher-v9"):
        sketcher.use_adapter(copy)
    sketcher.use_adapter(trained_adapter.adapter_dir)  # still usable afterwards
    assert sketcher.projected_gradient([("", "Sow barley in April.")]).shape == (1, sketcher.k)


def test_the_factory_still_builds_a_trak_index_on_request(
    tmp_path: Path, base_model_dir: Path, small_datanet, small_train: TrainConfig
) -> None:
    config = replace(small_train, steps=2, index_k=24, index_estimator="trak")
    result = train_adapter(small_datanet.snapshot, "trak", "o", base_model_dir, tmp_path, config)
    index = AttributionIndex.load(result.adapter_dir / "attribution_index")
    assert index.estimator == TRAK and index.preconditioner.shape == (24, 24)
    expected, _ = preconditioner(index.features, config.index_lambda_relative)
    np.testing.assert_allclose(index.preconditioner, expected, rtol=1e-5, atol=1e-8)


def test_train_config_refuses_an_unknown_estimator() -> None:
    with pytest.raises(ValueError, match="index_estimator"):
        TrainConfig(index_estimator="influence-v0")
    with pytest.raises(ValueError, match="positive"):
        TrainConfig(index_damping_relative=0.0)
    with pytest.raises(ValueError, match="positive"):
        TrainConfig(index_prior_damping_relative=-1.0)
