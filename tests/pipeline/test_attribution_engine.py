import base64
import json
from datetime import UTC, datetime

import numpy as np
import pytest
from attribution_support import (
    PROJECTION,
    WORKER,
    facts_for,
    make_adapter,
    make_result,
    signed_bytes,
)

from infra.settings import load_settings
from pipeline.attribution.artifacts import ArtifactCache
from pipeline.attribution.attributor import MethodVersion, attribute, evidence_hash, sketch_evidence
from pipeline.attribution.facts import Facts
from pipeline.attribution.methods import Basis, method_weights, mix_weights
from pipeline.attribution.parameters import DEFAULTS
from pipeline.attribution.processing import Origin, process_result
from pipeline.verify import record_difference
from schemas.events import PPM_TOTAL, AttributionRecord, MethodInfo, Parameters
from schemas.signatures import sign_payload


@pytest.fixture
def adapter(tmp_path):
    return make_adapter(tmp_path)


@pytest.fixture
def cache(tmp_path):
    return ArtifactCache(tmp_path)


def test_ok_record_ranks_examples_by_trak_score_and_weights_sum_exactly(adapter, cache):
    parameters = Parameters(top_k=5, gradient_weight_ppm=1_000_000, lexical_weight_ppm=0)
    record = attribute(make_result(adapter), parameters, cache)
    assert record.status == "ok"
    features = adapter["features"].astype(np.float64)
    precond = np.linalg.inv(
        features.T @ features + 0.1 * np.trace(features.T @ features) / 16 * np.eye(16)
    )
    expected_scores = features @ precond @ features[0]
    expected_order = list(np.argsort(-expected_scores)[:5])
    assert [e.example_index for e in record.top_examples] == expected_order
    assert sum(w.ppm for w in record.contributor_weights) == PPM_TOTAL
    # gradient only: weights follow the positive top-k scores per contributor
    positive = {}
    for e in record.top_examples:
        if e.score > 0:
            positive[e.contributor_id] = positive.get(e.contributor_id, 0.0) + e.score
    total = sum(positive.values())
    for weight in record.contributor_weights:
        assert abs(weight.ppm - positive[weight.contributor_id] / total * PPM_TOTAL) <= 1
    assert record.method.params["basis"] == Basis.GRADIENT
    assert record.method.params["estimator"] == "trak/1"  # the index's estimator
    # Named by what ran: the gradient method alone, scored by the index's estimator.
    assert (record.method.name, record.method.version) == ("trak", "3")
    assert record.index_hash == adapter["index_hash"]
    assert record.adapter_hash == adapter["adapter_hash"]


def test_same_inputs_give_the_same_record_and_any_change_changes_the_evidence(adapter, cache):
    parameters = Parameters()
    first = attribute(make_result(adapter), parameters, cache)
    again = attribute(make_result(adapter), parameters, ArtifactCache(adapter["dir"].parent))
    assert first.model_dump(exclude={"created_at"}) == again.model_dump(exclude={"created_at"})
    other_text = attribute(make_result(adapter, output_text="It is 13 copper."), parameters, cache)
    other_k = attribute(make_result(adapter), Parameters(top_k=3), cache)
    assert len({first.evidence_hash, other_text.evidence_hash, other_k.evidence_hash}) == 3


def test_span_method_credits_the_row_the_output_repeats(adapter, cache):
    row = adapter["examples"][7]
    result = make_result(adapter, output_text=f"Sure. {row.text}", sketch=np.zeros(16))
    record = attribute(result, Parameters(gradient_weight_ppm=0, lexical_weight_ppm=0), cache)
    assert record.method.params["basis"] == Basis.SPAN
    assert record.method.name == "span"
    assert [(w.contributor_id, w.ppm) for w in record.contributor_weights] == [
        (row.contributor_id, PPM_TOTAL)
    ]


def test_a_mix_is_named_by_its_methods(adapter, cache):
    row = adapter["examples"][7]
    result = make_result(adapter, output_text=f"Sure. {row.text}")
    record = attribute(result, Parameters(), cache)
    assert record.method.params["basis"] == Basis.MIX
    assert record.method.name == "trak+lexical+span"
    record = attribute(result, Parameters(lexical_weight_ppm=0), cache)
    assert record.method.name == "trak+span"


def _evidence_with(record: AttributionRecord, result, method: MethodInfo) -> str:
    return evidence_hash(
        request_id=record.request_id, adapter_id=record.adapter_id,
        result_adapter_hash=result.adapter_hash, sketch=sketch_evidence(result),
        adapter_hash=record.adapter_hash, index_hash=record.index_hash, method=method,
        output_text=result.output_text, prompt=result.prompt,
    )


def test_the_evidence_hash_covers_everything_the_method_reports(adapter, cache):
    result = make_result(adapter)
    record = attribute(result, Parameters(), cache)
    assert _evidence_with(record, result, record.method) == record.evidence_hash
    params = record.method.params
    for altered in (
        record.method.model_copy(update={"name": "ekfac-projected"}),
        record.method.model_copy(update={"params": {**params, "estimator": "ekfac-projected/1"}}),
        record.method.model_copy(update={"params": {**params, "basis": "span"}}),
        record.method.model_copy(update={"params": {**params, "projection": "other-v1"}}),
    ):
        assert _evidence_with(record, result, altered) != record.evidence_hash


def test_version_1_records_keep_their_name_and_their_evidence(adapter, cache):
    result = make_result(adapter)
    old = attribute(result, Parameters(), cache, MethodVersion.V1)
    assert (old.method.name, old.method.version) == ("trak+span", "1")
    assert old.method.params["estimator"] == "trak/1"
    # Version 1 hashed the parameters given, not what the record reports about its method.
    relabelled = old.method.model_copy(update={"params": {**old.method.params, "basis": "span"}})
    assert _evidence_with(old, result, relabelled) == old.evidence_hash
    version_2 = attribute(result, Parameters(), cache, MethodVersion.V2)
    assert old.contributor_weights == version_2.contributor_weights
    assert old.evidence_hash != version_2.evidence_hash


def test_version_2_records_do_not_name_the_projection_version_3_records_hash_it(adapter, cache):
    result = make_result(adapter)
    # Without the lexical method (new in version 3) both versions weigh alike.
    parameters = Parameters(lexical_weight_ppm=0)
    old = attribute(result, parameters, cache, MethodVersion.V2)
    current = attribute(result, parameters, cache)
    assert (old.method.version, current.method.version) == ("2", "3")
    assert "projection" not in old.method.params
    assert current.method.params["projection"] == PROJECTION
    assert old.contributor_weights == current.contributor_weights
    assert old.evidence_hash != current.evidence_hash


def test_verify_recomputes_each_record_with_its_own_method_version(tmp_path):
    settings = load_settings({"LORALEDGER_HOME": str(tmp_path)})
    adapter = make_adapter(settings.adapters_dir)
    cache = ArtifactCache(settings.adapters_dir)
    result = make_result(adapter)

    def difference(record: AttributionRecord):
        return record_difference(settings, result, record)

    for version in MethodVersion:
        record = attribute(result, Parameters(top_k=4), cache, version)
        assert difference(record) is None, version
    old = attribute(result, Parameters(top_k=4), cache, MethodVersion.V1)
    renamed = old.model_copy(update={"method": old.method.model_copy(update={"name": "trak"})})
    assert difference(renamed).field == "method.name"
    unknown = old.model_copy(update={"method": old.method.model_copy(update={"version": "9"})})
    assert difference(unknown).field == "method.version"


def test_mix_follows_gradient_weight():
    influence = {Basis.GRADIENT: {("a", "d"): 3.0}, Basis.SPAN: {("b", "d"): 10.0}}
    weights, used = mix_weights(influence, method_weights(800_000, 0), {}, min_weight_ppm=0)
    assert used == (Basis.GRADIENT, Basis.SPAN)
    assert weights == {("a", "d"): 800_000, ("b", "d"): 200_000}


def test_the_lexical_weight_takes_its_share_before_gradient_and_span_split_the_rest():
    influence = {
        Basis.GRADIENT: {("a", "d"): 3.0},
        Basis.LEXICAL: {("c", "d"): 1.0},
        Basis.SPAN: {("b", "d"): 10.0},
    }
    weights, used = mix_weights(influence, method_weights(800_000, 500_000), {}, min_weight_ppm=0)
    assert used == (Basis.GRADIENT, Basis.LEXICAL, Basis.SPAN)
    assert weights == {("a", "d"): 400_000, ("b", "d"): 100_000, ("c", "d"): 500_000}
    # A weighted method that found nothing leaves its share to the others, in proportion.
    del influence[Basis.SPAN]
    weights, used = mix_weights(influence, method_weights(800_000, 500_000), {}, min_weight_ppm=0)
    assert used == (Basis.GRADIENT, Basis.LEXICAL)
    assert weights == {("a", "d"): 444_444, ("c", "d"): 555_556}


def test_no_positive_influence_falls_back_to_span_then_to_example_counts():
    counts = {("a", "d"): 1, ("b", "d"): 3}
    weights, used = mix_weights(
        {Basis.SPAN: {("b", "d"): 2.0}}, method_weights(800_000, 0), counts, min_weight_ppm=0
    )
    assert (weights, used) == ({("b", "d"): PPM_TOTAL}, (Basis.SPAN,))
    weights, used = mix_weights(
        {Basis.GRADIENT: {("a", "d"): -1.0}, Basis.SPAN: {}},
        method_weights(800_000, 0),
        counts,
        min_weight_ppm=0,
    )
    assert used == (Basis.EXAMPLE_COUNTS,)
    assert weights == {("a", "d"): 250_000, ("b", "d"): 750_000}


def test_all_negative_scores_and_no_span_end_in_example_counts(adapter, cache):
    # A zero sketch scores every example 0 (no positive influence), and the output repeats no
    # four-token span of any row.
    result = make_result(adapter, sketch=np.zeros(16), output_text="Nothing known here.")
    record = attribute(result, Parameters(), cache)
    assert record.status == "ok"
    assert record.method.params["basis"] == Basis.EXAMPLE_COUNTS
    assert record.method.name == "example-counts"
    assert [w.ppm for w in record.contributor_weights] == [250_000] * 4


def test_error_results_produce_nothing(adapter, cache):
    assert attribute(make_result(adapter, status="error"), Parameters(), cache) is None


@pytest.mark.parametrize(
    ("damage", "code"),
    [
        ("remove_index", "missing_index"),
        ("tamper_index", "hash_mismatch"),
        ("tamper_weights", "hash_mismatch"),
        ("tamper_config", "hash_mismatch"),
        ("no_manifest", "unknown_adapter"),
    ],
)
def test_broken_artifacts_give_a_failed_record_with_the_reason(adapter, cache, damage, code):
    directory = adapter["dir"]
    if damage == "remove_index":
        (directory / "attribution_index" / "features.safetensors").unlink()
    elif damage == "tamper_index":
        meta = json.loads((directory / "attribution_index" / "index.json").read_text())
        meta["lambda"] = 0.0
        (directory / "attribution_index" / "index.json").write_text(json.dumps(meta))
    elif damage == "tamper_weights":
        (directory / "adapter_model.safetensors").write_bytes(b"other weights")
    elif damage == "tamper_config":
        (directory / "adapter_config.json").write_text('{"r": 8, "lora_alpha": 1e38}')
    else:
        (directory / "manifest.json").unlink()
    record = attribute(make_result(adapter), Parameters(), cache)
    assert record.status == "failed"
    assert record.failure_reason.startswith(f"{code}: ")
    assert record.contributor_weights == []
    assert record.method.name == "none"  # no method produced weights


def test_result_from_another_adapter_version_fails(adapter, cache):
    result = make_result(adapter).model_copy(update={"adapter_hash": "f" * 64})
    record = attribute(result, Parameters(), cache)
    assert record.failure_reason.startswith("hash_mismatch: ")


@pytest.mark.parametrize(("k", "seed"), [(8, 7), (16, 8)])
def test_sketch_from_another_projection_fails(adapter, cache, k, seed):
    result = make_result(adapter, sketch=np.ones(k, dtype=np.float32), seed=seed)
    record = attribute(result, Parameters(), cache)
    assert record.failure_reason.startswith("sketch_mismatch: ")


def test_missing_sketch_fails(adapter, cache):
    result = make_result(adapter).model_copy(update={"sketch": None})
    assert attribute(result, Parameters(), cache).failure_reason.startswith("no_sketch: ")


def test_unknown_adapter_fails(adapter, cache):
    result = make_result(adapter, adapter_id="nobody")
    assert attribute(result, Parameters(), cache).failure_reason.startswith("unknown_adapter: ")


def _process(raw, cache, facts=None):
    return process_result(
        raw, origin=Origin("t.results", 3, 42, datetime(2026, 1, 1, tzinfo=UTC)),
        facts=facts or Facts(), cache=cache,
        pricing=DEFAULTS.parameters_for_epoch, epoch_seconds=3600,
    )


def test_undecodable_bytes_go_to_the_dead_letters_with_their_position(cache):
    out = _process(b"\xff not json", cache)
    assert [o.topic for o in out] == ["dead-letters"]
    dead = out[0].event
    assert (dead.source_topic, dead.partition, dead.offset) == ("t.results", 3, 42)
    assert base64.b64decode(dead.raw_b64) == b"\xff not json"


def test_corrupt_sketch_gives_a_dead_letter_and_a_failed_record(adapter, cache):
    result = make_result(adapter)
    payload = json.loads(signed_bytes(result))
    payload["sketch"]["values_b64"] = payload["sketch"]["values_b64"][:-8]
    payload["signature"] = sign_payload(WORKER.key, payload)  # the worker sent it so
    out = _process(json.dumps(payload).encode(), cache, facts_for(result))
    assert [o.topic for o in out] == ["dead-letters", "attributions"]
    record = out[1].event
    assert out[1].key == b"req-1"
    assert record.status == "failed"
    assert record.failure_reason.startswith("corrupt_sketch: ")


def test_valid_result_gives_one_record_keyed_by_request_id(adapter, cache):
    result = make_result(adapter, request_id="req-9")
    out = _process(signed_bytes(result), cache, facts_for(result))
    assert [(o.topic, o.key) for o in out] == [("attributions", b"req-9")]
    assert out[0].event.status == "ok"


def test_cache_keeps_the_most_recent_adapters_and_reloads_new_versions(tmp_path):
    adapters = [make_adapter(tmp_path, f"adapter-{i}", seed=i) for i in range(3)]
    cache = ArtifactCache(tmp_path, capacity=2)
    for adapter_id in ("adapter-0", "adapter-1", "adapter-0", "adapter-2", "adapter-0"):
        cache.get(adapter_id)
    assert cache.loads == 3  # adapter-0 stayed, adapter-1 was evicted by adapter-2
    assert len(cache) == 2
    retrained = make_adapter(tmp_path, "adapter-0", seed=10)
    assert retrained["adapter_hash"] != adapters[0]["adapter_hash"]
    assert cache.get("adapter-0", retrained["adapter_hash"]).index_hash == retrained["index_hash"]
    assert cache.loads == 4


def test_path_traversal_in_adapter_id_is_refused(tmp_path):
    from pipeline.attribution.failures import AttributionFailure

    with pytest.raises(AttributionFailure, match="invalid adapter id"):
        ArtifactCache(tmp_path).get("../etc")


def test_an_unforeseen_error_fails_the_record_instead_of_the_processor(adapter, cache, monkeypatch):
    artifacts = cache.get("adapter-a")

    def broken(_query):
        raise RuntimeError("disk went away")

    monkeypatch.setattr(artifacts.index, "score", broken)
    record = attribute(make_result(adapter), Parameters(), cache)
    assert record.status == "failed"
    assert record.failure_reason == "internal_error: RuntimeError: disk went away"
    assert record.index_hash == adapter["index_hash"]
