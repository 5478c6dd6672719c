from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from inference.attribution_index import INDEX_FILES, AttributionIndex, preconditioner
from inference.factory import TrainConfig, train_adapter
from inference.sketch import Sketcher


@pytest.fixture(scope="module")
def sketcher(base_model_dir: Path, trained_adapter) -> Sketcher:
    return Sketcher(base_model_dir, trained_adapter.adapter_dir)


def test_index_files_hash_and_layout(trained_adapter, small_datanet) -> None:
    directory = trained_adapter.adapter_dir / "attribution_index"
    assert sorted(p.name for p in directory.iterdir()) == sorted(INDEX_FILES)
    index = AttributionIndex.load(directory, expected_hash=trained_adapter.manifest["index_hash"])
    rows = small_datanet.snapshot.rows
    assert index.features.shape == (len(rows), index.k) and index.features.dtype == np.float32
    assert index.preconditioner.shape == (index.k, index.k)
    assert index.examples.column("row_id").to_pylist() == [r.row_id for r in rows]
    assert index.examples.column("contributor_id").to_pylist() == [r.contributor_id for r in rows]
    assert set(index.examples.column("datanet_id").to_pylist()) == {"commons"}
    meta = json.loads((directory / "index.json").read_text())
    assert {"k", "seed", "projection", "lambda", "loss", "param_layout_hash", "estimator"} <= set(
        meta
    )
    expected, lam = preconditioner(index.features, meta["lambda_relative"])
    assert lam == pytest.approx(meta["lambda"])
    np.testing.assert_allclose(index.preconditioner, expected, rtol=1e-5, atol=1e-8)


def test_an_altered_index_is_refused(tmp_path: Path, trained_adapter) -> None:
    copy = tmp_path / "index"
    shutil.copytree(trained_adapter.adapter_dir / "attribution_index", copy)
    meta = json.loads((copy / "index.json").read_text())
    meta["lambda"] *= 2
    (copy / "index.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="hash"):
        AttributionIndex.load(copy, expected_hash=trained_adapter.manifest["index_hash"])
    assert AttributionIndex.load(copy).hash != trained_adapter.manifest["index_hash"]


def test_score_is_the_trak_score(trained_adapter) -> None:
    index = AttributionIndex.load(trained_adapter.adapter_dir / "attribution_index")
    queries = np.random.default_rng(0).standard_normal((3, index.k)).astype(np.float32)
    p64, f64 = index.preconditioner.astype(np.float64), index.features.astype(np.float64)
    expected = queries.astype(np.float64) @ p64 @ f64.T
    np.testing.assert_allclose(index.score(queries), expected, rtol=1e-9)
    np.testing.assert_allclose(index.score(queries[0]), index.score(queries)[0], rtol=1e-12)
    with pytest.raises(ValueError, match="shape"):
        index.score(np.zeros(index.k + 1, dtype=np.float32))


def test_sketcher_reproduces_the_index_features(sketcher: Sketcher, trained_adapter) -> None:
    index = AttributionIndex.load(trained_adapter.adapter_dir / "attribution_index")
    texts = index.examples.column("text").to_pylist()[:5]
    again = sketcher.projected_gradient([("", text) for text in texts])
    np.testing.assert_allclose(again, index.features[:5], rtol=1e-4, atol=1e-6)


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
