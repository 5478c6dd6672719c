"""Recompute an attribution from the log and the hashed artifacts, and say whether it matches.

`verify_request` reads the request, its result, its attribution record and its reward entries
from Kafka, with the registered worker keys and the parameter activations (a scan of the
topics, committed data only), then checks in order, stopping at the first difference:
1. the result answers a request on `requests` (same id, adapter and prompt or conversation):
   a result with no request is a mismatch;
2. the result is signed by the worker it names (the first key registered for it on `workers`);
3. usage recomputes: the prompt token ids are the base model's tokenizer's for the request's
   prompt or conversation (`inference.tokenizer.encode_prompt`), and usage counts the token ids
   (`pipeline.attribution.facts.usage_problem`);
4. the sketch is there and, recomputed on the CPU from the stored adapter for (prompt, output
   text) with the index's projection, agrees with the result's up to float rounding (relative
   L2 error <= SKETCH_RTOL: the worker may batch or run on another device);
5. the record: recomputed from the result with the method version and parameters the record
   names and the stored index, every field must be equal (scores up to SCORE_RTOL; ids, method
   name, ppm weights, hashes and the evidence hash exactly). A record of an older method
   version is recomputed as that version computed it. From method version 3 on, the
   parameters the record names must be those in force at the epoch in which the broker
   appended the result (older versions computed with the parameters current when processed);
6. the fee: the reward entries are exactly those `split_fee` makes from the result and record
   with the parameters in force at the epoch in which the broker appended the result, so they
   sum to usage x price.
An error result must have no record and no entries.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from inference.adapter_store import AdapterStore
from inference.tokenizer import Prompt, encode_prompt, load_tokenizer
from infra.kafka.events import Decoded, read_topic
from infra.settings import Settings
from pipeline.attribution.artifacts import ArtifactCache
from pipeline.attribution.attributor import MethodVersion, attribute, has_lexical, method_params
from pipeline.attribution.facts import Facts, RequestFacts, answered_request, usage_problem
from pipeline.attribution.spans import DEFAULT_MIN_SPAN_TOKENS
from pipeline.governance import active_parameters
from pipeline.rewards import epoch_of, split_fee
from schemas.codec import parse_object
from schemas.events import (
    AttributionRecord,
    InferenceRequest,
    InferenceResult,
    Parameters,
    ParametersActivated,
    RewardEntry,
    WorkerRegistered,
)
from schemas.signatures import signature_problem

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


@dataclass(frozen=True)
class LoggedResult:
    """A result as read from `results`: the JSON object it was sent as (what its signature
    covers) and when the broker appended it (what its epoch is)."""

    result: InferenceResult
    payload: dict[str, Any]
    appended_at: datetime

    @classmethod
    def of(cls, decoded: Decoded) -> LoggedResult:
        record = decoded.record
        return cls(decoded.event, parse_object(record.value),
                   datetime.fromtimestamp(record.timestamp / 1000, UTC))


@dataclass
class LoggedEvents:
    requests: list[InferenceRequest] = field(default_factory=list)
    results: list[LoggedResult] = field(default_factory=list)
    records: list[AttributionRecord] = field(default_factory=list)
    entries: list[RewardEntry] = field(default_factory=list)
    workers: list[WorkerRegistered] = field(default_factory=list)
    activations: list[ParametersActivated] = field(default_factory=list)


async def _scan(
    settings: Settings, topic: str, keep: Any, idle_s: float
) -> list[Decoded]:
    return [
        item
        async for item in read_topic(settings, topic, idle_timeout_s=idle_s)
        if item.event is not None and keep(item.event)
    ]


async def fetch_events(settings: Settings, request_id: str, idle_s: float = 2.0) -> LoggedEvents:
    def mine(event: Any) -> bool:
        return event.request_id == request_id

    scans = await asyncio.gather(
        _scan(settings, "requests", mine, idle_s),
        _scan(settings, "results", mine, idle_s),
        _scan(settings, "attributions", mine, idle_s),
        _scan(settings, "rewards", mine, idle_s),
        _scan(settings, "workers", lambda _: True, idle_s),
        _scan(settings, "governance-decisions",
              lambda e: isinstance(e, ParametersActivated), idle_s),
    )
    requests, results, records, entries, workers, activations = (
        [item.event for item in scan] for scan in scans
    )
    return LoggedEvents(
        requests, [LoggedResult.of(item) for item in scans[1]], records, entries, workers,
        activations,
    )


def expected_prompt_ids(base_model_dir: Path, prompt: Prompt) -> list[int]:
    """The token ids a worker feeds the base model for `prompt` (a text or a conversation), by
    the checkpoint's own tokenizer rules. FileNotFoundError when the model has no tokenizer;
    ValueError (NoChatTemplate) for a conversation on a checkpoint without a chat template."""
    return encode_prompt(load_tokenizer(base_model_dir), prompt)


def expected_entries(
    logged: LoggedResult,
    record: AttributionRecord,
    activations: list[ParametersActivated],
    cache: ArtifactCache,
    epoch_seconds: int,
) -> list[RewardEntry]:
    """The entries the processor pays `logged` with: priced with the activation in force at
    the epoch in which the broker appended it."""
    epoch = epoch_of(logged.appended_at, epoch_seconds)
    activation = active_parameters(activations, epoch)
    return split_fee(
        logged.result, record, activation.parameters, parameters_version=activation.version,
        adapter_owner=cache.owner_of(logged.result.adapter_id), epoch=epoch,
        at=logged.appended_at,
    )


def epoch_parameters_difference(
    logged: LoggedResult,
    record: AttributionRecord,
    activations: list[ParametersActivated],
    epoch_seconds: int,
) -> Difference | None:
    """Whether a record of method version 3 on names the parameters in force at its result's
    epoch (what the processor attributes with, so a replay gets the same mix)."""
    version = MethodVersion(record.method.version)
    if not has_lexical(version):
        return None
    activation = active_parameters(activations, epoch_of(logged.appended_at, epoch_seconds))
    for name, value in method_params(activation.parameters, version).items():
        if record.method.params.get(name) != value:
            return Difference(f"method.params.{name}", value, record.method.params.get(name))
    return None


def _entry_fields(entries: list[RewardEntry]) -> list[dict[str, Any]]:
    return sorted((entry.model_dump(mode="json") for entry in entries),
                  key=lambda fields: fields["entry_id"])


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

    adapter_dir = AdapterStore.from_settings(settings).adapter_dir(result.adapter_id)
    sketcher = Sketcher(settings.base_model_dir, adapter_dir.path)
    return sketcher.projected_gradient([(result.prompt_input, result.output_text)])[0]


def parameters_of(record: AttributionRecord) -> Parameters:
    """The governance parameters a record says it was computed with."""
    params = record.method.params
    return Parameters(
        top_k=int(params["top_k"]),
        gradient_weight_ppm=int(params["gradient_weight_ppm"]),
        min_weight_ppm=int(params["min_weight_ppm"]),
        # Records before method version 3 had no lexical method.
        lexical_weight_ppm=int(params.get("lexical_weight_ppm", 0)),
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
    logged = events.results[0]
    result = logged.result
    facts = Facts()
    for event in [*events.requests, *events.workers]:
        facts.learn(event)
    request = answered_request(result, facts)
    if isinstance(request, str):
        return differ("request", "a request this result answers", None, request)
    report.checked.append("result answers request")
    problem = signature_problem(logged.payload, facts.worker_keys.get(result.worker_id))
    if problem is not None:
        return differ("result.signature", f"signed by {result.worker_id}", problem)
    report.checked.append("worker signature")
    if result.status != "ok":
        if events.records or events.entries:
            return differ("attributions and entries (count)", 0,
                          len(events.records) + len(events.entries))
        report.checked.append("error result has no attribution")
        return report
    usage = _usage_difference(settings, result, request)
    if usage is not None:
        report.status, report.difference = "mismatch", usage
        return report
    report.checked.append("usage recounted")
    if len(events.records) != 1:
        return differ("attributions (count)", 1, len(events.records))
    record = events.records[0]
    if result.sketch is None:
        return differ("sketch", "present", None, "an ok result must carry its sketch")
    if check_sketch:
        try:
            recomputed = recompute_sketch(settings, result)
        except (FileNotFoundError, ValueError) as exc:
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
    difference = record_difference(settings, result, record)
    if difference is not None:
        report.status, report.difference = "mismatch", difference
        return report
    report.checked.append("attribution recomputed")
    difference = epoch_parameters_difference(
        logged, record, events.activations, settings.epoch_seconds
    )
    if difference is not None:
        report.status, report.difference = "mismatch", difference
        report.message = "the record was not computed with its epoch's parameters"
        return report
    report.checked.append("parameters of the result's epoch")
    expected = _entry_fields(expected_entries(
        logged, record, events.activations, ArtifactCache(settings.adapters_dir),
        settings.epoch_seconds,
    ))
    difference = first_difference({"entries": expected},
                                  {"entries": _entry_fields(events.entries)})
    if difference is not None:
        report.status, report.difference = "mismatch", difference
        return report
    report.checked.append("fee recomputed")
    return report


def record_difference(
    settings: Settings, result: InferenceResult, record: AttributionRecord
) -> Difference | None:
    """The first difference between `record` and the record recomputed from `result` with the
    method version and parameters `record` names."""
    method = record.method
    known = [version.value for version in MethodVersion]
    if method.version not in known:
        return Difference("method.version", " or ".join(known), method.version)
    if method.params.get("min_span_tokens") != DEFAULT_MIN_SPAN_TOKENS:
        return Difference(
            "method.params.min_span_tokens",
            DEFAULT_MIN_SPAN_TOKENS,
            method.params.get("min_span_tokens"),
        )
    recomputed = attribute(
        result, parameters_of(record), ArtifactCache(settings.adapters_dir),
        MethodVersion(method.version),
    )
    assert recomputed is not None
    return first_difference(_record_fields(recomputed), _record_fields(record))


def _usage_difference(
    settings: Settings, result: InferenceResult, request: RequestFacts
) -> Difference | None:
    try:
        prompt_ids = expected_prompt_ids(settings.base_model_dir, result.prompt_input)
    except (FileNotFoundError, ValueError) as exc:
        return Difference("prompt_token_ids", "recomputable", str(exc))
    if result.prompt_token_ids != prompt_ids:
        return Difference("prompt_token_ids", prompt_ids, result.prompt_token_ids)
    problem = usage_problem(result, request)
    if problem is not None:
        return Difference("usage", "recounted from the token ids", problem)
    return None


def verify_request(
    settings: Settings, request_id: str, *, check_sketch: bool = True
) -> VerifyReport:
    """Fetch the request's events from Kafka and verify them (see the module docstring)."""
    events = asyncio.run(fetch_events(settings, request_id))
    return verify_events(settings, request_id, events, check_sketch=check_sketch)
