"""The demo's steps on their own: no broker, no model, no ClickHouse."""

from __future__ import annotations

import socket
import sys
from datetime import UTC, datetime

import pytest

from inference.datanets import DatanetStore
from inference.factory import TrainConfig
from infra.settings import load_settings
from loraledger.demo_run import (
    DATANETS,
    Collected,
    DemoOptions,
    PreparedDatanet,
    Service,
    adapter_is_current,
    demo_rows,
    expected_snapshot_hash,
    make_requests,
    pick_traced_request,
    plan_broker,
)
from schemas.events import (
    AttributionRecord,
    ContributorWeight,
    InferenceResult,
    MethodInfo,
    RewardEntry,
    RewardRole,
    Usage,
    reward_entry_id,
)

SMALL = DemoOptions(adapters=2, requests=40, contributors_per_datanet=4, rows_per_contributor=3,
                    facts_per_contributor=1)


def test_contributor_ids_are_distinct_across_datanets():
    first, _ = demo_rows(DATANETS[0], SMALL)
    second, _ = demo_rows(DATANETS[1], SMALL)
    assert {e.contributor_id for e in first}.isdisjoint({e.contributor_id for e in second})
    assert all(e.contributor_id.startswith(f"{DATANETS[0].tag}-") for e in first)


def test_rows_are_deterministic_so_a_rerun_republishes_the_same_contributions():
    once, facts_once = demo_rows(DATANETS[0], SMALL)
    again, facts_again = demo_rows(DATANETS[0], SMALL)
    assert [e.contribution_id for e in once] == [e.contribution_id for e in again]
    assert [e.row_id for e in once] == [e.row_id for e in again]
    assert facts_once == facts_again
    assert len({e.contribution_id for e in once}) == len(once)


def test_expected_snapshot_hash_matches_the_store_after_applying_the_rows(tmp_path):
    spec = DATANETS[0]
    events, facts = demo_rows(spec, SMALL)
    store = DatanetStore(tmp_path)
    store.create(spec.name)
    for event in events:
        store.apply(event)
    assert store.snapshot(spec.name).snapshot_hash == expected_snapshot_hash(events)
    planted = {fact.contributor_id for fact in facts}
    assert planted <= set(store.info(spec.name).contributors)


def test_adapter_is_current_only_for_the_same_snapshot_config_and_base(tmp_path):
    spec = DATANETS[0]
    events, _ = demo_rows(spec, SMALL)
    store = DatanetStore(tmp_path)
    store.create(spec.name)
    for event in events:
        store.apply(event)
    store.snapshot(spec.name)
    snapshot = store.load_snapshot(spec.name)
    config = TrainConfig(steps=5)
    manifest = {
        "snapshot_hash": snapshot.manifest.snapshot_hash,
        "training_config": config.to_record(),
        "base_model_hash": "b" * 64,
    }
    assert adapter_is_current(manifest, snapshot, config, "b" * 64)
    assert not adapter_is_current(manifest, snapshot, TrainConfig(steps=6), "b" * 64)
    assert not adapter_is_current(manifest, snapshot, config, "c" * 64)
    assert not adapter_is_current({**manifest, "snapshot_hash": "0" * 64}, snapshot, config,
                                  "b" * 64)
    assert not adapter_is_current(None, snapshot, config, "b" * 64)


def _prepared(tmp_path, index: int) -> PreparedDatanet:
    spec = DATANETS[index]
    events, facts = demo_rows(spec, SMALL)
    store = DatanetStore(tmp_path / spec.name)
    store.create(spec.name)
    for event in events:
        store.apply(event)
    store.snapshot(spec.name)
    return PreparedDatanet(spec, store.load_snapshot(spec.name), facts, cached=False)


def test_requests_spread_over_adapters_and_ask_planted_facts(tmp_path):
    datanets = [_prepared(tmp_path, 0), _prepared(tmp_path, 1)]
    requests = make_requests(datanets, SMALL)
    assert len(requests) == SMALL.requests
    per_adapter = {r.adapter_id for r in requests}
    assert per_adapter == {"demo-valley-law", "demo-village-health"}
    fact_prompts = {fact.prompt for prepared in datanets for fact in prepared.facts}
    asked = [r for r in requests if r.prompt in fact_prompts]
    assert 0 < len(asked) < len(requests)
    for request in asked:
        owner = next(p for p in datanets if request.adapter_id.endswith(p.spec.name))
        assert request.prompt in {fact.prompt for fact in owner.facts}
    assert len({r.request_id for r in requests}) == len(requests)


def _result(request_id: str, status: str = "ok") -> InferenceResult:
    return InferenceResult(
        request_id=request_id, adapter_id="demo-valley-law", status=status,
        error_code=None if status == "ok" else "internal_error", prompt="In Foo, the",
        output_text=" bar", usage=Usage(prompt_tokens=4, completion_tokens=2),
        worker_id="demo-worker",
    )


def _record(request_id: str, weighted: bool = True) -> AttributionRecord:
    weights = [ContributorWeight(contributor_id="law-contributor-000",
                                 datanet_id="valley-law", ppm=1_000_000)] if weighted else []
    return AttributionRecord(
        request_id=request_id, adapter_id="demo-valley-law", status="ok",
        method=MethodInfo(name="m", version="1"), contributor_weights=weights,
        evidence_hash="e" * 64,
    )


def _entry(request_id: str) -> RewardEntry:
    return RewardEntry(
        entry_id=reward_entry_id(request_id, "treasury", "treasury"), request_id=request_id,
        adapter_id="demo-valley-law", epoch=0, beneficiary_id="treasury",
        role=RewardRole.TREASURY, amount=6, fee_total=60, parameters_version=0,
        created_at=datetime(2026, 1, 1, tzinfo=UTC),
    )


def test_a_request_is_done_once_result_attribution_and_rewards_are_in():
    collected = Collected()
    assert not collected.done("r1")
    collected.results["r1"] = _result("r1")
    assert not collected.done("r1")
    collected.attributions["r1"] = _record("r1")
    assert not collected.done("r1")
    collected.rewards["r1"].append(_entry("r1"))
    assert collected.done("r1")
    collected.results["r2"] = _result("r2", status="error")
    assert collected.done("r2")  # errors are neither attributed nor paid
    assert len(collected.events()) == 4


def test_the_traced_request_prefers_an_attributed_planted_fact():
    collected = Collected()
    for rid in ("a", "b", "c"):
        collected.results[rid] = _result(rid)
    collected.attributions["a"] = _record("a")
    collected.attributions["b"] = _record("b", weighted=False)
    assert pick_traced_request(collected, {}) == "a"
    with pytest.raises(RuntimeError, match="no request of this run was attributed"):
        pick_traced_request(Collected(), {})


def test_plan_broker_uses_a_broker_that_already_answers(tmp_path):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        settings = load_settings({"LORALEDGER_HOME": str(tmp_path),
                                  "KAFKA_BOOTSTRAP": f"127.0.0.1:{port}"})
        plan = plan_broker(settings)
        assert not plan.start_local and not plan.started_here
    plan = plan_broker(settings)  # nothing listens now: the demo starts and stops its own
    assert plan.start_local and plan.started_here


def test_service_stop_terminates_and_reports_a_failed_child(tmp_path, monkeypatch):
    monkeypatch.setattr("loraledger.demo_run.cli_command",
                        lambda *args: [sys.executable, "-c", "import time; time.sleep(60)"])
    service = Service("sleeper", [], tmp_path / "sleeper.log", {})
    service.check_alive()
    assert service.stop(grace_s=10) is not None
    assert service.process.poll() is not None
    monkeypatch.setattr("loraledger.demo_run.cli_command",
                        lambda *args: [sys.executable, "-c", "print('boom'); raise SystemExit(3)"])
    failing = Service("crasher", [], tmp_path / "crasher.log", {})
    failing.process.wait()
    with pytest.raises(RuntimeError, match=r"the crasher exited with code 3: boom"):
        failing.check_alive()
    failing.stop()


def test_options_refuse_bad_counts():
    with pytest.raises(ValueError, match="--adapters"):
        DemoOptions(adapters=len(DATANETS) + 1)
    with pytest.raises(ValueError, match="--requests"):
        DemoOptions(requests=0)
