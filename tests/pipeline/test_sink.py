"""A failed ledger write is retried until it succeeds, and writing again after a failure
part-way stores every row exactly once (failures injected at the ClickHouse client, the
embedded engine behind it)."""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import shutil
import tempfile
import uuid
from functools import partial
from pathlib import Path

import pytest

from infra.clickhouse_client import apply_ddl, drop_database, get_client
from infra.settings import load_settings
from pipeline.ledger import LedgerWriter
from pipeline.rewards import split_fee
from pipeline.sink import until_done
from schemas.events import (
    AttributionRecord,
    ContributorWeight,
    InferenceResult,
    MethodInfo,
    Parameters,
    Usage,
)


@pytest.fixture(scope="module")
def client():
    # The embedded engine serves one directory per process: every test module in this process
    # shares it, and each test works in its own database.
    path = Path(tempfile.gettempdir()) / f"loraledger-test-chdb-{os.getpid()}"
    atexit.register(shutil.rmtree, path, True)
    return get_client(load_settings({"CLICKHOUSE_URL": f"chdb://{path}"}))


@pytest.fixture
def database(client):
    name = f"t_{uuid.uuid4().hex[:12]}"
    apply_ddl(client, name)
    yield name
    drop_database(client, name)


class FailingInserts:
    """The real client, except that inserts into `table` fail the first `times` times."""

    def __init__(self, client, table: str, times: int) -> None:
        self._client = client
        self.table = table
        self.left = times

    def query(self, *args, **kwargs):
        return self._client.query(*args, **kwargs)

    def insert(self, table: str, *args, **kwargs):
        if table == self.table and self.left > 0:
            self.left -= 1
            raise OSError(28, "No space left on device")
        return self._client.insert(table, *args, **kwargs)


def paid_requests(count: int) -> list:
    events = []
    for index in range(count):
        result = InferenceResult(
            request_id=f"r{index}", adapter_id="ad-1", status="ok", worker_id="gpu-0",
            usage=Usage(prompt_tokens=5 + index, completion_tokens=2),
        )
        attribution = AttributionRecord(
            request_id=result.request_id, adapter_id="ad-1", status="ok",
            method=MethodInfo(name="trak", version="1"), evidence_hash="b" * 64,
            contributor_weights=[
                ContributorWeight(contributor_id="carol", datanet_id="commons", ppm=600_000),
                ContributorWeight(contributor_id="dave", datanet_id="commons", ppm=400_000),
            ],
        )
        entries = split_fee(result, attribution, Parameters(), parameters_version=0,
                            adapter_owner="olga", epoch=1)
        events += [result, attribution, *entries]
    return events


def stored(client, database: str) -> dict[str, list[int]]:
    """Rows and distinct ids per base table, and the rollups' totals."""
    counts = {}
    for table, key in (("inference_results", "request_id"), ("attributions", "request_id"),
                       ("attribution_rows", "(request_id, contributor_id)"),
                       ("reward_entries", "entry_id")):
        rows, distinct = client.query(
            f"SELECT count(), uniqExact({key}) FROM {database}.{table}").result_rows[0]
        counts[table] = [rows, distinct]
    counts["rollups"] = list(client.query(
        f"SELECT (SELECT sum(requests) FROM {database}.attribution_by_contributor), "
        f"(SELECT sum(entries) FROM {database}.rewards_by_beneficiary_epoch)").result_rows[0])
    return counts


@pytest.mark.parametrize("failing", ["inference_results", "attribution_rows", "attributions",
                                     "reward_entries"])
def test_a_write_failing_part_way_is_retried_until_every_row_is_stored_once(
    client, database, failing, caplog
):
    events = paid_requests(4)
    flaky = FailingInserts(client, failing, times=3)
    writer = LedgerWriter(flaky, database)
    with caplog.at_level(logging.WARNING, logger="pipeline.sink"):
        asyncio.run(until_done(partial(writer.write, events), "writing",
                               first_delay_s=0.01, max_delay_s=0.02))
    assert flaky.left == 0
    # One line per failure; the wait doubles up to its cap.
    assert [record.getMessage() for record in caplog.records] == [
        f"writing failed (attempt {attempt}), retrying in {delay} s: "
        "[Errno 28] No space left on device"
        for attempt, delay in ((1, 0.01), (2, 0.02), (3, 0.02))
    ]
    entries = sum(1 for event in events if hasattr(event, "entry_id"))
    assert stored(client, database) == {
        "inference_results": [4, 4],
        "attributions": [4, 4],
        "attribution_rows": [8, 8],
        "reward_entries": [entries, entries],
        "rollups": [8, entries],
    }


def test_a_record_redelivered_after_a_partial_write_keeps_the_first_attribution(
    client, database
):
    first = paid_requests(1)[1]
    again = first.model_copy(update={"contributor_weights": [
        ContributorWeight(contributor_id="erin", datanet_id="commons", ppm=1_000_000)]})
    flaky = FailingInserts(client, "attributions", times=1)
    writer = LedgerWriter(flaky, database)
    with pytest.raises(OSError):
        writer.write([first])  # its contributor rows are in, its record row is not
    # Redelivered in log order, with a later record of the same request.
    writer.write([first, again])
    rows = client.query(
        f"SELECT contributor_id FROM {database}.attribution_rows ORDER BY contributor_id"
    ).result_rows
    assert rows == [("carol",), ("dave",)]
    assert client.query("SELECT count() FROM {db:Identifier}.attributions",
                        parameters={"db": database}).result_rows == [(1,)]
