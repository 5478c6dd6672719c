"""Rebuilding the ledger: the same events in any order and batching give the same tables, and
promoting a rebuilt database replaces the live one's contents (embedded engine, no broker)."""

from __future__ import annotations

import atexit
import os
import random
import shutil
import tempfile
import uuid
from pathlib import Path

import pytest

from infra.clickhouse_client import apply_ddl, drop_database, get_client
from infra.settings import load_settings
from pipeline.ledger import TABLES, LedgerWriter
from pipeline.replay import ROLLUP_TABLES, promote, table_fingerprint
from pipeline.rewards import split_fee
from schemas.events import (
    AttributionRecord,
    ContributorWeight,
    InferenceResult,
    MethodInfo,
    Parameters,
    Usage,
)

ALL_TABLES = [*TABLES, *ROLLUP_TABLES]


@pytest.fixture(scope="module")
def client():
    path = Path(tempfile.gettempdir()) / f"loraledger-test-chdb-{os.getpid()}"
    atexit.register(shutil.rmtree, path, True)
    return get_client(load_settings({"CLICKHOUSE_URL": f"chdb://{path}"}))


@pytest.fixture
def databases(client):
    names = [f"t_{uuid.uuid4().hex[:12]}" for _ in range(2)]
    for name in names:
        apply_ddl(client, name)
    yield names
    for name in names:
        drop_database(client, name)


def events(count: int) -> list:
    out = []
    for index in range(count):
        result = InferenceResult(
            request_id=f"r{index}", adapter_id=f"ad-{index % 3}", status="ok", worker_id="w",
            usage=Usage(prompt_tokens=5 + index, completion_tokens=index % 4),
        )
        attribution = AttributionRecord(
            request_id=f"r{index}", adapter_id=result.adapter_id, status="ok",
            method=MethodInfo(name="trak", version="1"), evidence_hash="b" * 64,
            contributor_weights=[
                ContributorWeight(contributor_id=f"c{index % 4}", datanet_id="dn-1", ppm=550_000),
                ContributorWeight(contributor_id=f"c{(index + 1) % 4}", datanet_id="dn-2",
                                  ppm=450_000),
            ],
        )
        out += [result, attribution,
                *split_fee(result, attribution, Parameters(), parameters_version=0,
                           adapter_owner="o", epoch=1)]
    return out


def test_order_and_batching_do_not_change_the_ledger(client, databases):
    live, rebuilt = databases
    original = events(12)
    LedgerWriter(client, live).write(original)
    shuffled = original * 2  # a replay that also meets every event twice
    random.Random(7).shuffle(shuffled)
    writer = LedgerWriter(client, rebuilt)
    for start in range(0, len(shuffled), 7):
        writer.write(shuffled[start:start + 7])
    for table in ALL_TABLES:
        assert table_fingerprint(client, live, table) == table_fingerprint(client, rebuilt, table)
    assert len(table_fingerprint(client, live, "reward_entries")) > 12
    by_datanet = table_fingerprint(client, live, "value_by_datanet_epoch")
    paid = sum(e.amount for e in original if getattr(e, "role", None) == "contributor")
    assert {row[1] for row in by_datanet} == {"dn-1", "dn-2"}
    assert sum(row[2] for row in by_datanet) == paid


def test_promote_replaces_the_live_ledger(client, databases):
    live, rebuilt = databases
    LedgerWriter(client, live).write(events(3))
    LedgerWriter(client, rebuilt).write(events(5))
    expected = {table: table_fingerprint(client, rebuilt, table) for table in ALL_TABLES}
    promote(client, rebuilt, live)
    assert {table: table_fingerprint(client, live, table) for table in ALL_TABLES} == expected
    names = {row[0] for row in client.query("SHOW DATABASES").result_rows}
    assert rebuilt not in names
    with pytest.raises(ValueError, match="onto itself"):
        promote(client, live, live)
