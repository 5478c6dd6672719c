"""One result in, one attribution record out: a pure function of the result, the parameters
and the adapter's hashed artifacts, so `loraledger verify` can recompute it exactly.

The record's method is what ran (`MethodVersion.V2`): its name is the methods the weights came
from, the gradient method named by the index's estimator that scored it (`ekfac-projected+span`
for a mix, `ekfac-projected` or `span` alone, `example-counts` for the fallback, `none` for a
failed record), and its params hold the governance parameters, `min_span_tokens`, and for an ok
record the basis and the estimator with its version.

Evidence hash: sha256 of a canonical JSON document (sorted keys, no spaces) holding everything
the computation read and everything the record says about how it was computed: request and
adapter ids, the result's adapter hash, the sketch's sha256 over its raw float32 bytes plus its
k, seed and projection, the adapter hash and index hash of the artifacts used, the prompt, the
output text, and the method (name, version and every parameter). A field that was never read
(for instance the index of an adapter that failed to load) is null. What the computation found
(scores, weights, a failure's reason) is not hashed but recomputed by `loraledger verify`:
scores agree across machines only up to float rounding.

Records of version 1 (`MethodVersion.V1`) named every method `trak+span` and hashed only the
governance parameters and `min_span_tokens`; `attribute(..., version=MethodVersion.V1)` still
computes them, so that they still verify.
"""

from __future__ import annotations

import base64
import hashlib
import json
from enum import StrEnum
from typing import Any

from pipeline.attribution.artifacts import AdapterArtifacts, ArtifactCache
from pipeline.attribution.failures import AttributionFailure, FailureCode
from pipeline.attribution.methods import (
    NO_METHOD,
    Basis,
    gradient_influence,
    method_name,
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


METHOD_VERSION = MethodVersion.V2
V1_METHOD_NAME = "trak+span"
# What version 1 reported about its own computation, and left out of the evidence hash.
V1_UNHASHED_PARAMS = ("basis", "estimator")


def method_params(parameters: Parameters) -> dict[str, float | int | str]:
    """The parameters given to the computation: governance's and the span length."""
    return {
        "gradient_weight_ppm": parameters.gradient_weight_ppm,
        "min_span_tokens": DEFAULT_MIN_SPAN_TOKENS,
        "min_weight_ppm": parameters.min_weight_ppm,
        "top_k": parameters.top_k,
    }


def method_info(
    version: MethodVersion,
    parameters: Parameters,
    ran: tuple[Basis, tuple[str, str]] | None = None,
) -> MethodInfo:
    """The method of a record of `version`: `ran` is the basis of the weights and the index's
    estimator (name, version), None for a failed record."""
    params = method_params(parameters)
    name = NO_METHOD
    if ran is not None:
        basis, (estimator, estimator_version) = ran
        name = method_name(basis, estimator)
        params = {**params, "basis": basis.value, "estimator": f"{estimator}/{estimator_version}"}
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
    result: InferenceResult, parameters: Parameters, artifacts: AdapterArtifacts
) -> tuple[list[ExampleScore], dict[tuple[str, str], int], Basis]:
    """The computation proper: top examples, ppm weights per (contributor, datanet), basis."""
    assert result.sketch is not None
    examples = top_examples(artifacts, result.sketch.to_array(), parameters.top_k)
    weights, basis = mix_weights(
        gradient_influence(examples),
        span_influence(artifacts, result.output_text, DEFAULT_MIN_SPAN_TOKENS, result.prompt_text),
        artifacts.example_counts(),
        gradient_weight_ppm=parameters.gradient_weight_ppm,
        min_weight_ppm=parameters.min_weight_ppm,
    )
    return examples, weights, basis


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
        examples, weights, basis = attribute_with(result, parameters, artifacts)
    except AttributionFailure as failure:
        return failed_record(
            result, parameters, failure, sketch=sketch, artifacts=artifacts, version=version
        )
    except Exception as exc:  # noqa: BLE001 - see FailureCode.INTERNAL
        failure = AttributionFailure(FailureCode.INTERNAL, f"{type(exc).__name__}: {exc}")
        return failed_record(
            result, parameters, failure, sketch=sketch, artifacts=artifacts, version=version
        )
    method = method_info(version, parameters, (basis, artifacts.index.estimator))
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
