"""The closing step: one request of this run followed from its prompt to its payout in the
ledger (then verified by `run`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from inference.data.synthetic import PlantedFact
from infra.clickhouse_client import DEFAULT_DATABASE
from loraledger.demo.errors import DemoError
from loraledger.demo.steps.collection import Collected
from loraledger.demo.steps.datanets import PreparedDatanet
from schemas.events import AttributionRecord, InferenceRequest, InferenceResult


@dataclass
class Trace:
    request: InferenceRequest
    result: InferenceResult
    attribution: AttributionRecord
    row_texts: dict[str, str]  # row id -> text, for the top examples
    planted_by: str | None  # the contributor who planted the asked fact, if it was one
    entries: list[tuple[Any, ...]]  # (beneficiary, role, amount, fee_total, reason), ledger


def reward_entries_of(client: Any, request_id: str) -> list[tuple[Any, ...]]:
    return list(client.query(
        f"SELECT beneficiary_id, role, amount, fee_total, reason "
        f"FROM {DEFAULT_DATABASE}.reward_entries FINAL "
        "WHERE request_id = {rid:String} ORDER BY amount DESC, beneficiary_id",
        parameters={"rid": request_id},
    ).result_rows)


def pick_traced_request(collected: Collected, facts: dict[str, PlantedFact]) -> str:
    """A request that asked a planted fact and was attributed (the most telling trace);
    failing that, any attributed one."""
    attributed = [
        rid for rid, record in collected.attributions.items()
        if record.status == "ok" and record.contributor_weights
    ]
    if not attributed:
        raise DemoError("no request of this run was attributed to any contributor")
    on_facts = [rid for rid in attributed if collected.results[rid].prompt in facts]
    return sorted(on_facts or attributed)[0]


def build_trace(
    client: Any, collected: Collected, requests: Sequence[InferenceRequest],
    datanets: Sequence[PreparedDatanet],
) -> Trace:
    facts = {fact.prompt: fact for prepared in datanets for fact in prepared.facts}
    request_id = pick_traced_request(collected, facts)
    request = next(request for request in requests if request.request_id == request_id)
    record = collected.attributions[request_id]
    texts = {row.row_id: row.text for prepared in datanets for row in prepared.snapshot.rows}
    fact = facts.get(request.prompt)
    return Trace(
        request=request,
        result=collected.results[request_id],
        attribution=record,
        row_texts={ex.row_id: texts.get(ex.row_id, "?") for ex in record.top_examples},
        planted_by=fact.contributor_id if fact else None,
        entries=reward_entries_of(client, request_id),
    )
