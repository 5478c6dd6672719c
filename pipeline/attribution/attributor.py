"""One result in, one attribution record out: a pure function of the result, the parameters
and the adapter's hashed artifacts, so `loraledger verify` can recompute it exactly.

Evidence hash: sha256 of a canonical JSON document (sorted keys, no spaces) holding everything
the computation read: request and adapter ids, the result's adapter hash, the sketch's sha256
over its raw float32 bytes plus its k, seed and projection, the adapter hash and index hash of
the artifacts used, the method parameters, the prompt and the output text. A field that was
never read (for instance the index of an adapter that failed to load) is null.
"""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

from pipeline.attribution.artifacts import AdapterArtifacts, ArtifactCache
from pipeline.attribution.failures import AttributionFailure, FailureCode
from pipeline.attribution.methods import (
    gradient_influence,
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

METHOD_NAME = "trak+span"
METHOD_VERSION = "1"


def method_params(parameters: Parameters) -> dict[str, float | int | str]:
    return {
        "gradient_weight_ppm": parameters.gradient_weight_ppm,
        "min_span_tokens": DEFAULT_MIN_SPAN_TOKENS,
        "min_weight_ppm": parameters.min_weight_ppm,
        "top_k": parameters.top_k,
    }


def evidence_hash(
    *,
    request_id: str,
    adapter_id: str,
    result_adapter_hash: str | None,
    sketch: dict[str, Any] | None,
    adapter_hash: str | None,
    index_hash: str | None,
    params: dict[str, float | int | str],
    output_text: str,
    prompt: str,
) -> str:
    document = {
        "adapter_hash": adapter_hash,
        "adapter_id": adapter_id,
        "index_hash": index_hash,
        "output_text": output_text,
        "params": params,
        "prompt": prompt,
        "request_id": request_id,
        "result_adapter_hash": result_adapter_hash,
        "sketch": sketch,
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
) -> AttributionRecord:
    params = method_params(parameters)
    adapter_hash = artifacts.adapter_hash if artifacts else None
    index_hash = artifacts.index_hash if artifacts else None
    return AttributionRecord(
        request_id=result.request_id,
        adapter_id=result.adapter_id,
        adapter_hash=adapter_hash or result.adapter_hash,
        status="failed",
        failure_reason=failure.reason,
        method=MethodInfo(name=METHOD_NAME, version=METHOD_VERSION, params=params),
        index_hash=index_hash,
        evidence_hash=evidence_hash(
            request_id=result.request_id,
            adapter_id=result.adapter_id,
            result_adapter_hash=result.adapter_hash,
            sketch=sketch,
            adapter_hash=adapter_hash,
            index_hash=index_hash,
            params=params,
            output_text=result.output_text,
            prompt=result.prompt_text,
        ),
    )


def attribute_with(
    result: InferenceResult, parameters: Parameters, artifacts: AdapterArtifacts
) -> tuple[list[ExampleScore], dict[tuple[str, str], int], str]:
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
    return examples, weights, basis.value


def attribute(
    result: InferenceResult, parameters: Parameters, cache: ArtifactCache
) -> AttributionRecord | None:
    """The attribution record of an ok result (status `failed` with a reason when it cannot be
    computed); None for an error result, which served nothing and so pays nobody."""
    if result.status != "ok":
        return None
    sketch = sketch_evidence(result)
    if result.sketch is None:
        failure = AttributionFailure(FailureCode.NO_SKETCH, "the ok result carries no sketch")
        return failed_record(result, parameters, failure)
    artifacts: AdapterArtifacts | None = None
    try:
        artifacts = cache.get(result.adapter_id, result.adapter_hash)
        _check_compatible(result, artifacts)
        examples, weights, basis = attribute_with(result, parameters, artifacts)
    except AttributionFailure as failure:
        return failed_record(result, parameters, failure, sketch=sketch, artifacts=artifacts)
    except Exception as exc:  # noqa: BLE001 - see FailureCode.INTERNAL
        failure = AttributionFailure(FailureCode.INTERNAL, f"{type(exc).__name__}: {exc}")
        return failed_record(result, parameters, failure, sketch=sketch, artifacts=artifacts)
    name, version = artifacts.index.estimator
    # The gradient method's estimator is the index's (pinned by index_hash): named for readers.
    params = {**method_params(parameters), "basis": basis, "estimator": f"{name}/{version}"}
    return AttributionRecord(
        request_id=result.request_id,
        adapter_id=result.adapter_id,
        adapter_hash=artifacts.adapter_hash,
        status="ok",
        method=MethodInfo(name=METHOD_NAME, version=METHOD_VERSION, params=params),
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
            params=method_params(parameters),
            output_text=result.output_text,
            prompt=result.prompt_text,
        ),
    )
