"""Builders shared by the demo step tests: small options, a prepared datanet in a temporary
store, and the events the log holds for a request."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from inference.datanets import DatanetStore
from loraledger.demo.options import DATANETS, DemoOptions
from loraledger.demo.steps.datanets import PreparedDatanet, demo_rows
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


def prepared(tmp_path: Path, index: int) -> PreparedDatanet:
    spec = DATANETS[index]
    events, facts = demo_rows(spec, SMALL)
    store = DatanetStore(tmp_path / spec.name)
    store.create(spec.name)
    for event in events:
        store.apply(event)
    store.snapshot(spec.name)
    return PreparedDatanet(spec, store.load_snapshot(spec.name), facts, cached=False)


def result(request_id: str, status: str = "ok") -> InferenceResult:
    return InferenceResult(
        request_id=request_id, adapter_id="demo-valley-law", status=status,
        error_code=None if status == "ok" else "internal_error", prompt="In Foo, the",
        output_text=" bar", usage=Usage(prompt_tokens=4, completion_tokens=2),
        worker_id="demo-worker",
    )


def record(request_id: str, weighted: bool = True) -> AttributionRecord:
    weights = [ContributorWeight(contributor_id="law-contributor-000",
                                 datanet_id="valley-law", ppm=1_000_000)] if weighted else []
    return AttributionRecord(
        request_id=request_id, adapter_id="demo-valley-law", status="ok",
        method=MethodInfo(name="m", version="1"), contributor_weights=weights,
        evidence_hash="e" * 64,
    )


def entry(request_id: str, role: RewardRole = RewardRole.TREASURY, amount: int = 6,
          fee_total: int = 60) -> RewardEntry:
    beneficiary = "treasury" if role == RewardRole.TREASURY else "law-contributor-000"
    return RewardEntry(
        entry_id=reward_entry_id(request_id, beneficiary, role.value), request_id=request_id,
        adapter_id="demo-valley-law", epoch=0, beneficiary_id=beneficiary,
        role=role, amount=amount, fee_total=fee_total, parameters_version=0,
        created_at=datetime(2026, 1, 1, tzinfo=UTC),
    )
