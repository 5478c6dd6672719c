"""Recompute an attribution from the log and the hashed artifacts, and say whether it matches.

`verify_request` reads the request, its result and its attribution record from Kafka (a scan of
the three topics, committed data only), then checks in order, stopping at the first difference:
1. the result answers the request (same adapter, same prompt or conversation);
2. the sketch: recomputed on the CPU from the stored adapter for (prompt, output text) with the
   index's projection, it must agree with the result's sketch up to float rounding (relative L2
   error <= SKETCH_RTOL: the worker may batch or run on another device);
3. the record: recomputed from the result with the parameters the record names and the stored
   index, every field must be equal (scores up to SCORE_RTOL; ids, ppm weights, hashes and the
   evidence hash exactly). An error result must have no record.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from infra.kafka.clients import read_topic
from infra.settings import Settings
from pipeline.attribution.artifacts import ArtifactCache, adapter_dir
from pipeline.attribution.attributor import METHOD_NAME, METHOD_VERSION, attribute
from pipeline.attribution.failures import AttributionFailure
from pipeline.attribution.spans import DEFAULT_MIN_SPAN_TOKENS
from schemas.events import AttributionRecord, InferenceRequest, InferenceResult, Parameters

SKETCH_RTOL = 1e-3
SCORE_RTOL = 1e-5


@dataclass(frozen=True)
class Difference:
    field: str
    expected: Any  # recomputed
    got: Any  # as published


@dataclass
class VerifyReport:
    request_id: str
    status: str  # "match", "mismatch" or "not_found"
    difference: Difference | None = None
    checked: list[str] = field(default_factory=list)
    sketch_relative_error: float | None = None
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "match"


@dataclass
class LoggedEvents:
    request: InferenceRequest | None = None
    results: list[InferenceResult] = field(default_factory=list)
    records: list[AttributionRecord] = field(default_factory=list)


async def _scan(settings: Settings, topic: str, request_id: str, idle_s: float) -> list[Any]:
    return [
        item.event
        async for item in read_topic(settings, topic, idle_timeout_s=idle_s)
        if item.event is not None and item.event.request_id == request_id
    ]


async def fetch_events(settings: Settings, request_id: str, idle_s: float = 2.0) -> LoggedEvents:
    requests, results, records = await asyncio.gather(
        _scan(settings, "requests", request_id, idle_s),
        _scan(settings, "results", request_id, idle_s),
        _scan(settings, "attributions", request_id, idle_s),
    )
    return LoggedEvents(requests[0] if requests else None, results, records)


def _close(expected: float, got: float, rtol: float) -> bool:
    return math.isclose(expected, got, rel_tol=rtol, abs_tol=rtol)


def first_difference(expected: Any, got: Any, path: str = "") -> Difference | None:
    """Depth-first over dicts and lists; floats compare within SCORE_RTOL."""
    if isinstance(expected, dict) and isinstance(got, dict):
        for key in sorted(expected.keys() | got.keys()):
            if key not in expected or key not in got:
                return Difference(f"{path}{key}", expected.get(key), got.get(key))
            found = first_difference(expected[key], got[key], f"{path}{key}.")
            if found:
                return found
        return None
    name = path.rstrip(".")
    if isinstance(expected, list) and isinstance(got, list):
        if len(expected) != len(got):
            return Difference(f"{name} (length)", len(expected), len(got))
        for i, (a, b) in enumerate(zip(expected, got, strict=True)):
            found = first_difference(a, b, f"{name}[{i}].")
            if found:
                return found
        return None
    if isinstance(expected, float) and isinstance(got, float):
        return None if _close(expected, got, SCORE_RTOL) else Difference(name, expected, got)
    return None if expected == got else Difference(name, expected, got)


def recompute_sketch(settings: Settings, result: InferenceResult) -> np.ndarray:
    """The result's sketch recomputed on the CPU from the stored adapter."""
    from inference.sketch import Sketcher

    sketcher = Sketcher(
        settings.base_model_dir, adapter_dir(settings.adapters_dir, result.adapter_id)
    )
    return sketcher.projected_gradient([(result.prompt_input, result.output_text)])[0]


def parameters_of(record: AttributionRecord) -> Parameters:
    """The governance parameters a record says it was computed with."""
    params = record.method.params
    return Parameters(
        top_k=int(params["top_k"]),
        gradient_weight_ppm=int(params["gradient_weight_ppm"]),
        min_weight_ppm=int(params["min_weight_ppm"]),
    )


def _record_fields(record: AttributionRecord) -> dict[str, Any]:
    return record.model_dump(mode="json", exclude={"created_at"})


def verify_events(
    settings: Settings, request_id: str, events: LoggedEvents, *, check_sketch: bool = True
) -> VerifyReport:
    report = VerifyReport(request_id, "match")

    def differ(name: str, expected: Any, got: Any, message: str = "") -> VerifyReport:
        report.status, report.difference = "mismatch", Difference(name, expected, got)
        report.message = message
        return report

    if not events.results:
        report.status, report.message = "not_found", "no result with this request id"
        return report
    if len(events.results) > 1:
        return differ("results (count)", 1, len(events.results))
    result = events.results[0]
    if events.request is not None:
        for name in ("adapter_id", "prompt_input"):
            if getattr(events.request, name) != getattr(result, name):
                return differ(
                    f"result.{name}", getattr(events.request, name), getattr(result, name)
                )
        report.checked.append("result answers request")
    if result.status != "ok":
        if events.records:
            return differ("attributions (count)", 0, len(events.records))
        report.checked.append("error result has no attribution")
        return report
    if len(events.records) != 1:
        return differ("attributions (count)", 1, len(events.records))
    record = events.records[0]
    if check_sketch and result.sketch is not None:
        try:
            recomputed = recompute_sketch(settings, result)
        except (FileNotFoundError, ValueError, AttributionFailure) as exc:
            return differ("sketch", "recomputable", str(exc), "the sketch could not be recomputed")
        published = result.sketch.to_array()
        if recomputed.shape != published.shape:
            return differ("sketch.k", int(recomputed.size), int(published.size))
        norm = float(np.linalg.norm(recomputed)) or 1.0
        error = float(np.linalg.norm(recomputed - published)) / norm
        report.sketch_relative_error = error
        if not error <= SKETCH_RTOL:
            return differ("sketch (relative L2 error)", f"<= {SKETCH_RTOL}", error)
        report.checked.append("sketch recomputed")
    method = record.method
    if (method.name, method.version) != (METHOD_NAME, METHOD_VERSION):
        return differ(
            "method", f"{METHOD_NAME}/{METHOD_VERSION}", f"{method.name}/{method.version}"
        )
    if method.params.get("min_span_tokens") != DEFAULT_MIN_SPAN_TOKENS:
        return differ(
            "method.params.min_span_tokens",
            DEFAULT_MIN_SPAN_TOKENS,
            method.params.get("min_span_tokens"),
        )
    recomputed_record = attribute(
        result, parameters_of(record), ArtifactCache(settings.adapters_dir)
    )
    assert recomputed_record is not None
    difference = first_difference(_record_fields(recomputed_record), _record_fields(record))
    if difference is not None:
        report.status, report.difference = "mismatch", difference
        return report
    report.checked.append("attribution recomputed")
    return report


def verify_request(
    settings: Settings, request_id: str, *, check_sketch: bool = True
) -> VerifyReport:
    """Fetch the request's events from Kafka and verify them (see the module docstring)."""
    events = asyncio.run(fetch_events(settings, request_id))
    return verify_events(settings, request_id, events, check_sketch=check_sketch)
