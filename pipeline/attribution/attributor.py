"""One result in, one attribution record out: a pure function of the result, the parameters
and the adapter's hashed artifacts, so `loraledger verify` can recompute it exactly.

The record's method is what ran (`MethodVersion.V3`): its name is the methods the weights came
from, joined by `+`, the gradient method named by the index's estimator that scored it
(`ekfac-projected+lexical+span` for a mix of all three, `ekfac-projected`, `lexical` or `span`
alone, `example-counts` for the fallback, `none` for a failed record), and its params hold the
governance parameters, `min_span_tokens`, the lexical method's constants, and for an ok record
the basis, the estimator with its version and the index's projection (how both the query's
sketch and the index's rows were computed, e.g. `factored-countsketch-v1`).

Evidence hash: sha256 of a canonical JSON document (sorted keys, no spaces) holding everything
the computation read and everything the record says about how it was computed: request and
adapter ids, the result's adapter hash, the sketch's sha256 over its raw float32 bytes plus its
k, seed and projection, the adapter hash and index hash of the artifacts used, the prompt, the
output text, and the method (name, version and every parameter). A field that was never read
(for instance the index of an adapter that failed to load) is null. What the computation found
(scores, weights, a failure's reason) is not hashed but recomputed by `loraledger verify`:
scores agree across machines only up to float rounding.

Older records are still computed as they were, so that they still verify: version 2
(`MethodVersion.V2`) had no lexical method (its params leave out the lexical weight and the
BM25 constants) and did not name the projection; version 1 (`MethodVersion.V1`) also named
every method `trak+span` and hashed only the governance parameters and `min_span_tokens`.
"""

from __future__ import annotations

import base64
import hashlib
import json
from enum import StrEnum
from typing import Any

from pipeline.attribution.artifacts import AdapterArtifacts, ArtifactCache
from pipeline.attribution.failures import AttributionFailure, FailureCode
from pipeline.attribution.lexical import BM25_B, BM25_K1, MIN_RELATIVE_SCORE
from pipeline.attribution.methods import (
    NO_METHOD,
    Basis,
    basis_of,
    gradient_influence,
    lexical_influence,
    method_name,
    method_weights,
    mix_weights,
    span_influence,
    top_examples,
)
from pipeline.attribution.spans import DEFAULT_MIN_SPAN_TOKENS
from schemas.events import (
    AttributionRecord,
    ContributorWeight,
    ExampleScore,
    InferenceResult,
    MethodInfo,
    Parameters,
)


class MethodVersion(StrEnum):
    V1 = "1"  # every record named V1_METHOD_NAME; the evidence hashed the parameters given only
    V2 = "2"  # named by what ran; the evidence hashes the whole method
    V3 = "3"  # adds the lexical method, and the params name the index's projection


METHOD_VERSION = MethodVersion.V3
V1_METHOD_NAME = "trak+span"
# What version 1 reported about its own computation, and left out of the evidence hash.
V1_UNHASHED_PARAMS = ("basis", "estimator")


def has_lexical(version: MethodVersion) -> bool:
    return version not in (MethodVersion.V1, MethodVersion.V2)


def method_params(
    parameters: Parameters, version: MethodVersion = METHOD_VERSION
) -> dict[str, float | int | str]:
    """The parameters given to the computation: governance's, the span length and, from
    version 3, the lexical method's constants."""
    params: dict[str, float | int | str] = {
        "gradient_weight_ppm": parameters.gradient_weight_ppm,
        "min_span_tokens": DEFAULT_MIN_SPAN_TOKENS,
        "min_weight_ppm": parameters.min_weight_ppm,
        "top_k": parameters.top_k,
    }
    if has_lexical(version):
        params |= {
            "bm25_b": BM25_B,
            "bm25_k1": BM25_K1,
            "lexical_min_relative": MIN_RELATIVE_SCORE,
            "lexical_weight_ppm": parameters.lexical_weight_ppm,
        }
    return params


def method_info(
    version: MethodVersion,
    parameters: Parameters,
    ran: tuple[tuple[Basis, ...], tuple[str, str], str] | None = None,
) -> MethodInfo:
    """The method of a record of `version`: `ran` is the methods the weights came from, the
    index's estimator (name, version) and its projection, None for a failed record."""
    params = method_params(parameters, version)
    name = NO_METHOD
    if ran is not None:
        used, (estimator, estimator_version), projection = ran
        name = method_name(used, estimator)
        params = {
            **params,
            "basis": basis_of(used).value,
            "estimator": f"{estimator}/{estimator_version}",
        }
        if version == MethodVersion.V3:
            params["projection"] = projection
    if version == MethodVersion.V1:
        name = V1_METHOD_NAME
    return MethodInfo(name=name, version=version.value, params=params)


def method_evidence(method: MethodInfo) -> dict[str, Any]:
    """The part of the evidence document that a record's method contributes."""
    if method.version == MethodVersion.V1:
        hashed = {k: v for k, v in method.params.items() if k not in V1_UNHASHED_PARAMS}
        return {"params": hashed}
    return {"method": method.model_dump(mode="json")}


def evidence_hash(
    *,
    request_id: str,
    adapter_id: str | None,
    result_adapter_hash: str | None,
    sketch: dict[str, Any] | None,
    adapter_hash: str | None,
    index_hash: str | None,
    method: MethodInfo,
    output_text: str,
    prompt: str,
) -> str:
    document = {
        "adapter_hash": adapter_hash,
        "adapter_id": adapter_id,
        "index_hash": index_hash,
        "output_text": output_text,
        "prompt": prompt,
        "request_id": request_id,
        "result_adapter_hash": result_adapter_hash,
        "sketch": sketch,
        **method_evidence(method),
    }
    canonical = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def sketch_evidence(result: InferenceResult) -> dict[str, Any] | None:
    if result.sketch is None:
        return None
    raw = base64.b64decode(result.sketch.values_b64)
    return {
        "k": result.sketch.k,
        "projection": result.sketch.projection,
        "seed": result.sketch.seed,
        "sha256": hashlib.sha256(raw).hexdigest(),
    }


def _check_compatible(result: InferenceResult, artifacts: AdapterArtifacts) -> None:
    if result.adapter_hash is None:
        raise AttributionFailure(FailureCode.HASH_MISMATCH, "the result names no adapter hash")
    if result.adapter_hash != artifacts.adapter_hash:
        raise AttributionFailure(
            FailureCode.HASH_MISMATCH,
            f"the result was served by adapter version {result.adapter_hash[:12]}…, the stored "
            f"adapter is {artifacts.adapter_hash[:12]}…",
        )
    sketch, meta = result.sketch, artifacts.index.meta
    assert sketch is not None
    expected = (artifacts.index.k, meta.get("seed"), meta.get("projection"))
    if (sketch.k, sketch.seed, sketch.projection) != expected:
        raise AttributionFailure(
            FailureCode.SKETCH_MISMATCH,
            f"sketch (k={sketch.k}, seed={sketch.seed}, {sketch.projection}) does not match the "
            f"index (k={expected[0]}, seed={expected[1]}, {expected[2]})",
        )


def failed_record(
    result: InferenceResult,
    parameters: Parameters,
    failure: AttributionFailure,
    *,
    sketch: dict[str, Any] | None = None,
    artifacts: AdapterArtifacts | None = None,
    version: MethodVersion = METHOD_VERSION,
) -> AttributionRecord:
    method = method_info(version, parameters)
    adapter_hash = artifacts.adapter_hash if artifacts else None
    index_hash = artifacts.index_hash if artifacts else None
    return AttributionRecord(
        request_id=result.request_id,
        adapter_id=result.adapter_id,
        adapter_hash=adapter_hash or result.adapter_hash,
        status="failed",
        failure_reason=failure.reason,
        method=method,
        index_hash=index_hash,
        evidence_hash=evidence_hash(
            request_id=result.request_id,
            adapter_id=result.adapter_id,
            result_adapter_hash=result.adapter_hash,
            sketch=sketch,
            adapter_hash=adapter_hash,
            index_hash=index_hash,
            method=method,
            output_text=result.output_text,
            prompt=result.prompt_text,
        ),
    )


def attribute_with(
    result: InferenceResult,
    parameters: Parameters,
    artifacts: AdapterArtifacts,
    version: MethodVersion = METHOD_VERSION,
) -> tuple[list[ExampleScore], dict[tuple[str, str], int], tuple[Basis, ...]]:
    """The computation proper: top examples, ppm weights per (contributor, datanet), and the
    methods they came from."""
    assert result.sketch is not None
    examples = top_examples(artifacts, result.sketch.to_array(), parameters.top_k)
    text, prompt = result.output_text, result.prompt_text
    influence = {
        Basis.GRADIENT: gradient_influence(examples),
        Basis.SPAN: span_influence(artifacts, text, DEFAULT_MIN_SPAN_TOKENS, prompt),
    }
    lexical_weight_ppm = 0
    if has_lexical(version):
        influence[Basis.LEXICAL] = lexical_influence(artifacts, text, parameters.top_k, prompt)
        lexical_weight_ppm = parameters.lexical_weight_ppm
    weights, used = mix_weights(
        influence,
        method_weights(parameters.gradient_weight_ppm, lexical_weight_ppm),
        artifacts.example_counts(),
        min_weight_ppm=parameters.min_weight_ppm,
    )
    return examples, weights, used


def attribute(
    result: InferenceResult,
    parameters: Parameters,
    cache: ArtifactCache,
    version: MethodVersion = METHOD_VERSION,
) -> AttributionRecord | None:
    """The attribution record of an ok result (status `failed` with a reason when it cannot be
    computed); None for an error result, which served nothing and so pays nobody. `version`
    is the record format: the current one, or an older one to recompute an older record."""
    if result.status != "ok":
        return None
    sketch = sketch_evidence(result)
    if result.adapter_id is None:
        failure = AttributionFailure(
            FailureCode.BASE_MODEL, "the base model answered alone: no datanet contributed"
        )
        return failed_record(result, parameters, failure, sketch=sketch, version=version)
    if result.sketch is None:
        failure = AttributionFailure(FailureCode.NO_SKETCH, "the ok result carries no sketch")
        return failed_record(result, parameters, failure, version=version)
    artifacts: AdapterArtifacts | None = None
    try:
        artifacts = cache.get(result.adapter_id, result.adapter_hash)
        _check_compatible(result, artifacts)
        examples, weights, used = attribute_with(result, parameters, artifacts, version)
    except AttributionFailure as failure:
        return failed_record(
            result, parameters, failure, sketch=sketch, artifacts=artifacts, version=version
        )
    except Exception as exc:  # noqa: BLE001 - see FailureCode.INTERNAL
        failure = AttributionFailure(FailureCode.INTERNAL, f"{type(exc).__name__}: {exc}")
        return failed_record(
            result, parameters, failure, sketch=sketch, artifacts=artifacts, version=version
        )
    projection = str(artifacts.index.meta.get("projection"))
    method = method_info(version, parameters, (used, artifacts.index.estimator, projection))
    return AttributionRecord(
        request_id=result.request_id,
        adapter_id=result.adapter_id,
        adapter_hash=artifacts.adapter_hash,
        status="ok",
        method=method,
        index_hash=artifacts.index_hash,
        top_examples=examples,
        contributor_weights=[
            ContributorWeight(contributor_id=contributor, datanet_id=datanet, ppm=ppm)
            for (contributor, datanet), ppm in weights.items()
        ],
        evidence_hash=evidence_hash(
            request_id=result.request_id,
            adapter_id=result.adapter_id,
            result_adapter_hash=result.adapter_hash,
            sketch=sketch,
            adapter_hash=artifacts.adapter_hash,
            index_hash=artifacts.index_hash,
            method=method,
            output_text=result.output_text,
            prompt=result.prompt_text,
        ),
    )
