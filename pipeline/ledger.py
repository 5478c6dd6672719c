"""Events -> ClickHouse ledger rows, written idempotently.

The writer inserts only rows whose deterministic id is not in the base table yet, so a retried
batch, a redelivered message or a replay adds nothing, and the materialized rollups (which see
every inserted block) never count a row twice. The base tables are ReplacingMergeTree on the
same ids as a second line of defence. One writer per partition is assumed: an event's partition
is fixed by its key, so no two writers race on one id.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from clickhouse_connect.driver.client import Client
from pydantic import BaseModel

from infra.clickhouse_client import DEFAULT_DATABASE, check_database
from schemas.events import (
    AttributionRecord,
    InferenceResult,
    ParametersActivated,
    Proposal,
    ProposalTallied,
    RewardEntry,
    Vote,
)


@dataclass(frozen=True)
class TableSpec:
    name: str
    id_column: str  # the deterministic id the writer deduplicates on
    columns: tuple[str, ...]
    # Sorting-key columns before the id, with their types: the lookup of existing ids filters on
    # them too, so it reads a few granules instead of the whole table.
    key_prefix: tuple[tuple[str, str], ...] = ()


TABLES: dict[str, TableSpec] = {
    spec.name: spec
    for spec in (
        TableSpec("inference_results", "request_id", (
            "request_id", "adapter_id", "worker_id", "status", "error_code", "prompt_tokens",
            "completion_tokens", "total_ms", "cache_tier", "adapter_hash", "created_at")),
        TableSpec("attributions", "request_id", (
            "request_id", "adapter_id", "status", "failure_reason", "method", "method_version",
            "index_hash", "evidence_hash", "contributors", "created_at")),
        # Several rows per request, written in one insert: a request id found here has all
        # its contributor rows. They are written before the record's row in `attributions`.
        TableSpec("attribution_rows", "request_id", (
            "request_id", "contributor_id", "datanet_id", "adapter_id", "ppm", "method",
            "created_at")),
        TableSpec("reward_entries", "entry_id", (
            "entry_id", "request_id", "adapter_id", "epoch", "beneficiary_id", "role", "amount",
            "fee_total", "parameters_version", "reason", "created_at", "datanet_id"),
            key_prefix=(("epoch", "UInt64"), ("beneficiary_id", "String"))),
        TableSpec("proposals", "proposal_id", (
            "proposal_id", "proposer_id", "epoch", "changes", "description", "created_at")),
        TableSpec("votes", "vote_id", (
            "vote_id", "proposal_id", "voter_id", "support", "created_at")),
        TableSpec("proposal_tallies", "proposal_id", (
            "proposal_id", "epoch", "yes_weight", "no_weight", "passed", "created_at")),
        TableSpec("parameter_versions", "version", (
            "version", "effective_epoch", "parameters", "proposal_id", "created_at")),
    )
}

Row = tuple[Any, ...]

# The adapter_id column of a request the base model answered alone: no adapter id is empty.
BASE_MODEL_COLUMN = ""


def _result_rows(event: InferenceResult) -> dict[str, list[Row]]:
    return {"inference_results": [(
        event.request_id, event.adapter_id or BASE_MODEL_COLUMN, event.worker_id, event.status,
        event.error_code.value if event.error_code else "",
        event.usage.prompt_tokens, event.usage.completion_tokens,
        event.timings.total_ms if event.timings else 0.0,
        event.cache_tier.value, event.adapter_hash or "", event.created_at,
    )]}


def _attribution_rows(event: AttributionRecord) -> dict[str, list[Row]]:
    weights = event.contributor_weights if event.status == "ok" else []
    return {
        "attributions": [(
            event.request_id, event.adapter_id or BASE_MODEL_COLUMN, event.status,
            event.failure_reason or "",
            event.method.name, event.method.version, event.index_hash or "",
            event.evidence_hash, len(weights), event.created_at,
        )],
        "attribution_rows": [
            (event.request_id, weight.contributor_id, weight.datanet_id,
             event.adapter_id or BASE_MODEL_COLUMN,
             weight.ppm, event.method.name, event.created_at)
            for weight in weights
        ],
    }


def _reward_rows(event: RewardEntry) -> dict[str, list[Row]]:
    return {"reward_entries": [(
        event.entry_id, event.request_id, event.adapter_id or BASE_MODEL_COLUMN, event.epoch,
        event.beneficiary_id,
        event.role.value, event.amount, event.fee_total, event.parameters_version, event.reason,
        event.created_at, event.datanet_id or "",
    )]}


def _proposal_rows(event: Proposal) -> dict[str, list[Row]]:
    return {"proposals": [(
        event.proposal_id, event.proposer_id, event.epoch,
        event.changes.model_dump_json(exclude_none=True), event.description, event.created_at,
    )]}


def _vote_rows(event: Vote) -> dict[str, list[Row]]:
    return {"votes": [(
        event.vote_id, event.proposal_id, event.voter_id, int(event.support), event.created_at,
    )]}


def _tally_rows(event: ProposalTallied) -> dict[str, list[Row]]:
    return {"proposal_tallies": [(
        event.proposal_id, event.epoch, event.yes_weight, event.no_weight, int(event.passed),
        event.created_at,
    )]}


def _activation_rows(event: ParametersActivated) -> dict[str, list[Row]]:
    return {"parameter_versions": [(
        event.version, event.effective_epoch, event.parameters.model_dump_json(),
        event.proposal_id or "", event.created_at,
    )]}


_CONVERTERS: dict[type, Callable[[Any], dict[str, list[Row]]]] = {
    InferenceResult: _result_rows,
    AttributionRecord: _attribution_rows,
    RewardEntry: _reward_rows,
    Proposal: _proposal_rows,
    Vote: _vote_rows,
    ProposalTallied: _tally_rows,
    ParametersActivated: _activation_rows,
}

LEDGER_EVENTS: tuple[type, ...] = tuple(_CONVERTERS)


def rows_for(event: BaseModel) -> dict[str, list[Row]]:
    """The ledger rows of one event, by table."""
    try:
        converter = _CONVERTERS[type(event)]
    except KeyError:
        raise ValueError(f"the ledger stores no {type(event).__name__} events") from None
    return converter(event)


class LedgerWriter:
    """Writes events into one database's base tables, skipping ids already there."""

    def __init__(self, client: Client, database: str = DEFAULT_DATABASE) -> None:
        self.client = client
        self.database = check_database(database)

    def _existing(self, spec: TableSpec, rows: list[Row]) -> set[str]:
        """The ids of `rows` that `spec`'s table holds already."""
        if not rows:
            return set()
        key = spec.columns.index(spec.id_column)
        prefix = {
            (column, column_type): sorted({row[spec.columns.index(column)] for row in rows})
            for column, column_type in spec.key_prefix
        }
        return self._stored_ids(spec, {str(row[key]) for row in rows}, prefix)

    def _stored_ids(
        self, spec: TableSpec, ids: set[str],
        prefix: dict[tuple[str, str], list[Any]] | None = None,
    ) -> set[str]:
        filters = [f"toString({spec.id_column}) IN {{ids:Array(String)}}"]
        parameters: dict[str, object] = {"ids": sorted(ids)}
        for (column, column_type), values in (prefix or {}).items():
            filters.append(f"{column} IN {{{column}:Array({column_type})}}")
            parameters[column] = values
        found = self.client.query(
            f"SELECT DISTINCT toString({spec.id_column}) FROM {self.database}.{spec.name} "
            f"WHERE {' AND '.join(filters)}",
            parameters=parameters,
        ).result_rows
        return {row[0] for row in found}

    def write(self, events: Iterable[BaseModel]) -> dict[str, int]:
        """Insert the rows of `events` that are new; returns rows inserted per table.

        Each table's new rows go in one insert, and each table is checked against what it
        holds, so writing the same events again after a failure part-way adds only what is
        missing. A request's first attribution record wins: its contributor rows are written
        before its row in `attributions`, and only while neither table has the request."""
        batches: dict[str, list[Row]] = {}
        attributed: set[str] = set()
        for event in events:
            for table, rows in rows_for(event).items():
                if table == "attribution_rows":
                    if event.request_id in attributed:  # a later record of the same request
                        continue
                    attributed.add(event.request_id)
                batches.setdefault(table, []).extend(rows)
        inserted: dict[str, int] = {}
        for table in sorted(batches, key=lambda name: name != "attribution_rows"):
            spec = TABLES[table]
            key = spec.columns.index(spec.id_column)
            rows = batches[table]
            if not rows:
                inserted[table] = 0
                continue
            existing = self._existing(spec, rows)
            if table == "attribution_rows":
                existing |= self._stored_ids(TABLES["attributions"], {row[key] for row in rows})
                # Several rows per request; a record redelivered within the batch repeats its
                # rows: keep one of each.
                new_rows = list(dict.fromkeys(row for row in rows if row[key] not in existing))
            else:
                seen: set[str] = set()
                new_rows = []
                for row in rows:
                    row_id = str(row[key])
                    if row_id in existing or row_id in seen:
                        continue
                    seen.add(row_id)
                    new_rows.append(row)
            if new_rows:
                self.client.insert(
                    table, new_rows, column_names=list(spec.columns), database=self.database
                )
            inserted[table] = len(new_rows)
        return inserted
