"""`verify_request` end to end: a real adapter and index trained on the tiny base model, real
sketches, events through the real broker and the attribution loop; then forgeries."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest
from attribution_support import WORKER, train_adapters
from kafka_stack import provisioned_settings, stack_environment

from inference.text_codec import TextCodec
from infra.kafka.clients import ensure_topics
from infra.kafka.events import publish, read_topic
from infra.kafka.security import PROCESSOR
from infra.settings import Settings
from pipeline.attribution.agent import run_attribution
from pipeline.attribution.parameters import DEFAULTS
from pipeline.verify import (
    LoggedResult,
    expected_prompt_ids,
    fetch_events,
    verify_events,
    verify_request,
)
from schemas.events import (
    InferenceRequest,
    InferenceResult,
    Parameters,
    ParametersActivated,
    RewardEntry,
    Sketch,
    Usage,
    reward_entry_id,
)
from schemas.signatures import event_payload

pytestmark = pytest.mark.integration


@dataclass
class Published:
    settings: Settings
    honest: str
    forged_weights: str
    forged_sketch: str
    error: str
    no_sketch: str
    orphan: str
    forged_entry: str


def _result(
    settings: Settings,
    request: InferenceRequest,
    output: str,
    sketch: Sketch | None,
    weights_hash: str,
    *,
    ok: bool = True,
):
    """The result a worker would sign: the tokenizer's ids and the usage that counts them."""
    codec = TextCodec.from_model_dir(settings.base_model_dir)
    fields = {
        "request_id": request.request_id,
        "adapter_id": request.adapter_id,
        "prompt": request.prompt,
        "adapter_hash": weights_hash,
        "worker_id": WORKER.name,
    }
    if not ok:
        return WORKER.sign(InferenceResult(status="error", error_code="internal_error", **fields))
    prompt_ids = expected_prompt_ids(settings.base_model_dir, request.prompt)
    output_ids = codec.encode(output)
    return WORKER.sign(InferenceResult(
        status="ok", output_text=output, sketch=sketch, prompt_token_ids=prompt_ids,
        output_token_ids=output_ids, finish_reason="length",
        usage=Usage(prompt_tokens=len(prompt_ids), completion_tokens=len(output_ids)),
        **fields,
    ))


async def _attribute_until(settings: Settings, count: int) -> list:
    stop = asyncio.Event()
    task = asyncio.create_task(run_attribution(settings.as_principal(PROCESSOR), DEFAULTS, stop))
    try:
        for _ in range(120):
            records = [
                r.event async for r in read_topic(settings, "attributions", idle_timeout_s=0.5)
            ]
            if len(records) >= count:
                return records
            if task.done():
                task.result()
        raise AssertionError("the attribution loop produced too few records")
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> Published:
    home = tmp_path_factory.mktemp("home")
    env = {**stack_environment(home / "clickhouse"), "LORALEDGER_HOME": str(home)}
    settings = provisioned_settings(env)
    adapters = train_adapters(settings, ["adapter-v"])
    weights_hash = adapters.adapter_hashes["adapter-v"]

    def sketch(prompt: str, output: str, noise: float = 0.0) -> Sketch:
        return adapters.sketch("adapter-v", prompt, output, noise)

    fact = adapters.facts[0]
    requests = [InferenceRequest(adapter_id="adapter-v", prompt=fact.prompt) for _ in range(7)]
    honest, forged_weights, forged_sketch, error, no_sketch, orphan, forged_entry = requests
    genuine = sketch(fact.prompt, fact.completion)
    results = [
        _result(settings, honest, fact.completion, genuine, weights_hash),
        _result(settings, forged_weights, " 7 beads.", sketch(fact.prompt, " 7 beads."),
                weights_hash),
        _result(settings, forged_sketch, " 7 beads.", sketch(fact.prompt, " 7 beads.", 0.5),
                weights_hash),
        _result(settings, error, "", None, weights_hash, ok=False),
        _result(settings, no_sketch, fact.completion, None, weights_hash),
        _result(settings, orphan, fact.completion, genuine, weights_hash),
        _result(settings, forged_entry, fact.completion, genuine, weights_hash),
    ]
    asyncio.run(ensure_topics(settings))
    published_requests = [r for r in requests if r is not orphan]
    asyncio.run(publish(settings, [WORKER.as_worker(), *published_requests, *results]))
    records = asyncio.run(_attribute_until(settings, 5))
    original = next(r for r in records if r.request_id == forged_weights.request_id)
    # The forgery: a copy of the genuine record with one ppm moved from the last contributor
    # to the first, published as a second record for the same request.
    weights = list(original.contributor_weights)
    assert len(weights) >= 2
    weights[0] = weights[0].model_copy(update={"ppm": weights[0].ppm + 1})
    weights[-1] = weights[-1].model_copy(update={"ppm": weights[-1].ppm - 1})
    asyncio.run(publish(settings, [original.model_copy(update={"contributor_weights": weights})]))
    # One more entry for a paid request: the entries no longer sum to its fee.
    asyncio.run(publish(settings, [RewardEntry(
        entry_id=reward_entry_id(forged_entry.request_id, "mallory", "treasury"),
        request_id=forged_entry.request_id, adapter_id="adapter-v", epoch=0,
        beneficiary_id="mallory", role="treasury", amount=1, fee_total=1, parameters_version=0,
    )]))
    return Published(
        settings,
        honest.request_id,
        forged_weights.request_id,
        forged_sketch.request_id,
        error.request_id,
        no_sketch.request_id,
        orphan.request_id,
        forged_entry.request_id,
    )


def test_an_honest_record_matches_after_recomputing_sketch_and_attribution(published):
    report = verify_request(published.settings, published.honest)
    assert report.status == "match", report.difference
    assert report.checked == [
        "result answers request",
        "worker signature",
        "usage recounted",
        "sketch recomputed",
        "attribution recomputed",
        "parameters of the result's epoch",
        "fee recomputed",
    ]
    assert report.sketch_relative_error is not None and report.sketch_relative_error <= 1e-3


def test_a_second_record_for_one_request_is_reported(published):
    report = verify_request(published.settings, published.forged_weights)
    assert report.status == "mismatch"
    assert report.difference.field == "attributions (count)"


def test_a_record_with_altered_weights_is_reported(published):
    events = asyncio.run(fetch_events(published.settings, published.forged_weights))
    assert len(events.records) == 2
    events.records = events.records[1:]
    report = verify_events(published.settings, published.forged_weights, events)
    assert report.status == "mismatch"
    assert report.difference.field == "contributor_weights[0].ppm"
    assert report.difference.got == report.difference.expected + 1


def test_a_record_computed_with_other_parameters_than_its_epochs_is_reported(published):
    events = asyncio.run(fetch_events(published.settings, published.honest))
    (logged,) = events.results
    events.activations = [ParametersActivated(
        version=1, effective_epoch=0, parameters=Parameters(top_k=3),
        created_at=logged.appended_at,
    )]
    report = verify_events(published.settings, published.honest, events, check_sketch=False)
    assert report.status == "mismatch"
    assert (report.difference.field, report.difference.expected) == ("method.params.top_k", 3)


def test_a_sketch_that_is_not_the_adapters_gradient_is_reported(published):
    report = verify_request(published.settings, published.forged_sketch)
    assert report.status == "mismatch"
    assert report.difference.field == "sketch (relative L2 error)"
    # The record itself is consistent with the published (forged) sketch:
    assert verify_request(published.settings, published.forged_sketch, check_sketch=False).ok


def test_an_error_result_verifies_with_no_record(published):
    report = verify_request(published.settings, published.error)
    assert report.ok
    assert "error result has no attribution" in report.checked


def test_a_result_without_its_sketch_does_not_verify(published):
    report = verify_request(published.settings, published.no_sketch, check_sketch=False)
    assert report.status == "mismatch"
    assert report.difference.field == "sketch"


def test_a_result_without_a_request_does_not_verify(published):
    report = verify_request(published.settings, published.orphan, check_sketch=False)
    assert report.status == "mismatch"
    assert report.difference.field == "request"


def test_entries_that_do_not_recompute_from_the_fee_do_not_verify(published):
    report = verify_request(published.settings, published.forged_entry, check_sketch=False)
    assert report.status == "mismatch"
    assert report.difference.field.startswith("entries")


def test_usage_and_signatures_that_do_not_recompute_do_not_verify(published):
    events = asyncio.run(fetch_events(published.settings, published.honest))
    (logged,) = events.results
    inflated = logged.result.model_copy(update={
        "usage": Usage(prompt_tokens=4_000_000_000, completion_tokens=1)})
    resigned = WORKER.sign(inflated)
    events.results = [LoggedResult(resigned, event_payload(resigned), logged.appended_at)]
    report = verify_events(published.settings, published.honest, events, check_sketch=False)
    assert report.difference.field == "usage"
    padded_ids = [*logged.result.prompt_token_ids, 5]
    padded = WORKER.sign(logged.result.model_copy(update={"prompt_token_ids": padded_ids}))
    events.results = [LoggedResult(padded, event_payload(padded), logged.appended_at)]
    report = verify_events(published.settings, published.honest, events, check_sketch=False)
    assert report.difference.field == "prompt_token_ids"
    events.results = [LoggedResult(inflated, event_payload(inflated), logged.appended_at)]
    report = verify_events(published.settings, published.honest, events, check_sketch=False)
    assert report.difference.field == "result.signature"


def test_an_unknown_request_is_not_found(published):
    assert verify_request(published.settings, "no-such-request").status == "not_found"
