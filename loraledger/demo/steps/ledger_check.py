"""Step 7, the ledger: wait for the pipeline's sink to commit past this run's events, then
compare the ClickHouse ledger with the log and write whatever the sink missed."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from infra.clickhouse_client import DEFAULT_DATABASE
from infra.kafka.clients import make_admin
from infra.settings import Settings
from loraledger.demo.errors import DemoError
from loraledger.demo.steps.collection import Collected, Partition
from pipeline.app import consumer_group
from pipeline.ledger import LedgerWriter


async def wait_for_pipeline_commits(
    settings: Settings, last_offsets: dict[Partition, int], timeout_s: float
) -> bool:
    """Wait until the pipeline's consumer group has committed past every event of this run.
    Faust commits an offset once every agent reading the topic is done with the event, the
    ledger sink included, so this is the sink catching up; False if it did not in time."""
    admin = make_admin(settings)
    await admin.start()
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            committed = await admin.list_consumer_group_offsets(
                consumer_group(settings), partitions=list(last_offsets)
            )
            if all(
                partition in committed and committed[partition].offset > offset
                for partition, offset in last_offsets.items()
            ):
                return True
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.5)
    finally:
        await admin.close()


@dataclass(frozen=True)
class LedgerCheck:
    expected: dict[str, int]  # table -> rows the log says this run produced
    found_before: dict[str, int]  # table -> rows the sink had written
    backfilled: dict[str, int]  # table -> rows written now, from the log

    @property
    def sink_complete(self) -> bool:
        return self.found_before == self.expected

    def describe(self) -> str:
        """One line for the step's outcome."""
        if self.sink_complete:
            return "the sink wrote every row"
        return (f"the sink had written {self.found_before} of {self.expected}; "
                "wrote the rest from the log")


def ledger_counts(client: Any, request_ids: Sequence[str]) -> dict[str, int]:
    counts = {}
    for table, column in (("inference_results", "request_id"), ("attributions", "request_id"),
                          ("reward_entries", "entry_id")):
        counts[table] = int(client.query(
            f"SELECT uniqExact({column}) FROM {DEFAULT_DATABASE}.{table} "
            "WHERE request_id IN {ids:Array(String)}",
            parameters={"ids": list(request_ids)},
        ).result_rows[0][0])
    return counts


def check_ledger(client: Any, collected: Collected, request_ids: Sequence[str]) -> LedgerCheck:
    """Compare the ledger with the log for this run; whatever the sink did not write (it stopped
    between a batch and its write) is written now from the log, idempotently, and reported."""
    expected = {
        "inference_results": len(collected.results),
        "attributions": len(collected.attributions),
        "reward_entries": sum(len(entries) for entries in collected.rewards.values()),
    }
    found = ledger_counts(client, request_ids)
    backfilled: dict[str, int] = {}
    if found != expected:
        written = LedgerWriter(client).write(collected.events())
        backfilled = {table: rows for table, rows in written.items() if rows}
        after = ledger_counts(client, request_ids)
        if after != expected:
            raise DemoError(f"the ledger holds {after} rows for this run, the log {expected}")
    return LedgerCheck(expected, found, backfilled)
