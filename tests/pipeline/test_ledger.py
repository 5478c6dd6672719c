"""The ledger writer and the queries, on the embedded engine: idempotent writes, rollups that
do not double count, statements that explain each payment."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from infra.clickhouse_client import apply_ddl, drop_database, get_client
from infra.settings import load_settings
from pipeline import queries
from pipeline.ledger import LedgerWriter, rows_for
from pipeline.rewards import TREASURY_ID, split_fee
from schemas.events import (
    AttributionRecord,
    ContributorWeight,
    FeeSplit,
    InferenceResult,
    MethodInfo,
    ParameterChanges,
    Parameters,
    ParametersActivated,
    Proposal,
    ProposalTallied,
    Usage,
    Vote,
)

HASH = "a" * 64
DAY1 = datetime(2026, 3, 1, 10, 0, tzinfo=UTC)


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


def result(
    request_id: str, adapter: str, tokens: int, when: datetime = DAY1, status: str = "ok"
) -> InferenceResult:
    return InferenceResult(
        request_id=request_id,
        adapter_id=adapter,
        status=status,
        error_code=None if status == "ok" else "internal_error",
        usage=Usage(prompt_tokens=tokens, completion_tokens=0),
        worker_id="gpu-0",
        created_at=when,
    )


def attribution(
    request_id: str, adapter: str, weights: list[tuple[str, str, int]] | None
) -> AttributionRecord:
    if weights is None:
        return AttributionRecord(
            request_id=request_id,
            adapter_id=adapter,
            status="failed",
            failure_reason="no index",
            method=MethodInfo(name="trak", version="1"),
            evidence_hash=HASH,
        )
    return AttributionRecord(
        request_id=request_id,
        adapter_id=adapter,
        status="ok",
        method=MethodInfo(name="trak", version="1"),
        evidence_hash=HASH,
        contributor_weights=[
            ContributorWeight(contributor_id=c, datanet_id=d, ppm=p) for c, d, p in weights
        ],
    )


PARAMETERS = Parameters(
    fee_split=FeeSplit(contributors=5000, adapter_owner=2500, compute_operator=1500, treasury=1000),
    default_price_per_token=10,
)


def ledger_events():
    """Three requests: two attributed, one failed attribution, plus one error result."""
    specs = [
        ("r1", "ad-1", 10, DAY1, [("alice", "dn-a", 600_000), ("bob", "dn-b", 400_000)]),
        ("r2", "ad-1", 20, DAY1 + timedelta(days=1), [("alice", "dn-a", 1_000_000)]),
        ("r3", "ad-2", 7, DAY1, None),
    ]
    events = []
    for request_id, adapter, tokens, when, weights in specs:
        res = result(request_id, adapter, tokens, when)
        att = attribution(request_id, adapter, weights)
        events += [res, att]
        events += split_fee(
            res,
            att,
            PARAMETERS,
            parameters_version=0,
            adapter_owner="olga",
            epoch=int(when.timestamp()) // 3600,
        )
    events.append(result("r4", "ad-2", 3, DAY1, status="error"))
    return events


def test_ddl_applies_twice(client, database):
    assert apply_ddl(client, database) == []
    tables = {row[0] for row in client.query(
        "SHOW TABLES FROM {db:Identifier}", parameters={"db": database}).result_rows}
    assert {
        "reward_entries",
        "rewards_by_beneficiary_epoch",
        "usage_by_adapter_day",
        "value_by_datanet",
        "attribution_by_contributor",
        "proposals",
    } <= tables


def test_rows_for_refuses_events_the_ledger_does_not_store():
    from schemas.events import DeadLetter

    with pytest.raises(ValueError, match="DeadLetter"):
        rows_for(
            DeadLetter.for_bytes(
                b"x", source_topic="t", partition=0, offset=0, consumer="c", reason="bad"
            )
        )


def test_writes_are_idempotent_and_rollups_do_not_double_count(client, database):
    writer = LedgerWriter(client, database)
    events = ledger_events()
    first = writer.write(events)
    assert first["inference_results"] == 4
    assert first["attribution_rows"] == 3
    again = writer.write(events + events)  # a redelivered batch holding duplicates
    assert set(again.values()) == {0}
    rewards_total = client.query(
        f"SELECT sum(amount) FROM {database}.rewards_by_beneficiary_epoch"
    ).result_rows[0][0]
    assert rewards_total == (10 + 20 + 7) * 10
    entries = client.query("SELECT count() FROM {db:Identifier}.reward_entries",
                           parameters={"db": database}).result_rows[0][0]
    assert entries == len({e.entry_id for e in events if hasattr(e, "entry_id")})


def test_duplicates_within_one_batch_count_once(client, database):
    writer = LedgerWriter(client, database)
    events = ledger_events()
    inserted = writer.write(events + events)
    assert inserted["attribution_rows"] == 3
    assert inserted["reward_entries"] == len({e.entry_id for e in events if hasattr(e, "entry_id")})
    rollup = client.query(
        f"SELECT sum(requests), sum(ppm_total) FROM {database}.attribution_by_contributor"
    ).result_rows[0]
    assert rollup == (3, 2_000_000)


def test_entries_per_request_sum_to_fee(client, database):
    LedgerWriter(client, database).write(ledger_events())
    rows = client.query(
        f"SELECT request_id, sum(amount), any(fee_total) FROM {database}.reward_entries FINAL "
        "GROUP BY request_id"
    ).result_rows
    assert {row[0] for row in rows} == {"r1", "r2", "r3"}
    assert all(total == fee for _, total, fee in rows)


def test_rewards_query_filters_by_bound_parameters(client, database):
    LedgerWriter(client, database).write(ledger_events())
    everyone = queries.rewards(client, database)
    by_beneficiary = {}
    for record in everyone.records():
        by_beneficiary[record["beneficiary_id"]] = (
            by_beneficiary.get(record["beneficiary_id"], 0) + record["amount"]
        )
    assert sum(by_beneficiary.values()) == 370
    # r3's attribution failed: its contributor share went to the treasury.
    assert by_beneficiary[TREASURY_ID] > 37
    alice = queries.rewards(client, database, beneficiary="alice")
    assert {r["beneficiary_id"] for r in alice.records()} == {"alice"}
    assert sum(r["amount"] for r in alice.records()) == by_beneficiary["alice"]
    epoch = int(DAY1.timestamp()) // 3600
    in_epoch = queries.rewards(client, database, epoch=epoch)
    assert {r["epoch"] for r in in_epoch.records()} == {epoch}
    hostile = queries.rewards(client, database, beneficiary="x' OR 1=1 --")
    assert hostile.rows == []


def test_usage_per_adapter_per_day(client, database):
    LedgerWriter(client, database).write(ledger_events())
    records = queries.usage(client, database).records()
    by_key = {(r["adapter_id"], str(r["day"])): r for r in records}
    assert by_key[("ad-1", "2026-03-01")]["requests"] == 1
    assert by_key[("ad-1", "2026-03-01")]["fees"] == 100
    assert by_key[("ad-1", "2026-03-02")]["prompt_tokens"] == 20
    assert by_key[("ad-2", "2026-03-01")]["requests"] == 1
    assert by_key[("ad-2", "2026-03-01")]["errors"] == 1
    assert by_key[("ad-2", "2026-03-01")]["fees"] == 70
    only = queries.usage(client, database, adapter="ad-2").records()
    assert {r["adapter_id"] for r in only} == {"ad-2"}


def test_datanet_value(client, database):
    events = ledger_events()
    LedgerWriter(client, database).write(events)
    records = {r["datanet_id"]: r for r in queries.datanets(client, database).records()}
    assert records["dn-a"]["requests"] == 2
    assert records["dn-a"]["request_equivalents"] == pytest.approx(1.6)
    assert records["dn-b"]["contributors"] == 1
    paid = {}
    for e in events:
        if getattr(e, "role", None) == "contributor":
            paid[e.beneficiary_id] = paid.get(e.beneficiary_id, 0) + e.amount
    assert records["dn-a"]["paid"] == paid["alice"]
    assert records["dn-b"]["paid"] == paid["bob"]


def test_contributor_statement_explains_each_payment(client, database):
    events = ledger_events()
    LedgerWriter(client, database).write(events)
    statement = queries.contributor_statement(client, "alice", database).records()
    assert [r["request_id"] for r in statement] == ["r1", "r2"]
    assert [r["weight_ppm"] for r in statement] == [600_000, 1_000_000]
    assert {r["method"] for r in statement} == {"trak"}
    assert statement[1]["amount"] == 100  # 5000 bps of 200, all of it alice's
    assert queries.contributor_statement(client, "nobody", database).rows == []


def test_proposals_with_votes_tally_and_activation(client, database):
    changes = ParameterChanges(top_k=8)
    proposal = Proposal(proposal_id="p1", proposer_id="alice", epoch=5, changes=changes)
    votes = [
        Vote(vote_id="v1", proposal_id="p1", voter_id="alice", support=False, created_at=DAY1),
        Vote(
            vote_id="v2",
            proposal_id="p1",
            voter_id="alice",
            support=True,
            created_at=DAY1 + timedelta(seconds=1),
        ),
        Vote(vote_id="v3", proposal_id="p1", voter_id="bob", support=False, created_at=DAY1),
    ]
    tally = ProposalTallied(proposal_id="p1", epoch=5, yes_weight=90, no_weight=10, passed=True)
    activation = ParametersActivated(
        version=1, effective_epoch=6, parameters=changes.apply(Parameters()), proposal_id="p1"
    )
    open_one = Proposal(
        proposal_id="p2",
        proposer_id="bob",
        epoch=7,
        changes=ParameterChanges(default_price_per_token=3),
    )
    LedgerWriter(client, database).write([proposal, *votes, tally, activation, open_one])
    records = {r["proposal_id"]: r for r in queries.proposals(client, database).records()}
    assert records["p1"]["status"] == "passed"
    assert (records["p1"]["yes_votes"], records["p1"]["no_votes"]) == (1, 1)
    assert records["p1"]["activated_version"] == 1
    assert json.loads(records["p1"]["changes"]) == {"top_k": 8}
    assert records["p2"]["status"] == "open"


def test_query_cli_prints_json_csv_and_tables(client, database, monkeypatch):
    from typer.testing import CliRunner

    from loraledger.cli import app

    LedgerWriter(client, database).write(ledger_events())
    monkeypatch.setenv("CLICKHOUSE_URL", f"chdb://{Path(tempfile.gettempdir())}"
                                         f"/loraledger-test-chdb-{os.getpid()}")
    runner = CliRunner()
    as_json = runner.invoke(app, ["query", "contributor", "alice", "--format", "json",
                                  "--database", database])
    assert as_json.exit_code == 0, as_json.output
    assert [row["request_id"] for row in json.loads(as_json.output)] == ["r1", "r2"]
    as_csv = runner.invoke(app, ["query", "usage", "--adapter", "ad-1", "-f", "csv",
                                 "--database", database])
    assert as_csv.output.splitlines()[0].startswith("adapter_id,day,requests")
    assert len(as_csv.output.splitlines()) == 3
    table = runner.invoke(app, ["query", "rewards", "--beneficiary", "bob",
                                "--database", database])
    assert table.exit_code == 0 and "bob" in table.output
    bad = runner.invoke(app, ["query", "contributor", "../etc", "--database", database])
    assert bad.exit_code != 0 and "invalid contributor id" in bad.output
    bad_format = runner.invoke(app, ["query", "datanets", "-f", "xml", "--database", database])
    assert bad_format.exit_code != 0 and "unknown format" in bad_format.output


def mixed_events():
    """One request whose contributor carol has weight in two datanets, in epoch E, and one
    single-datanet request an epoch later."""
    events = []
    specs = [
        ("m1", DAY1, [("carol", "dn-a", 500_000), ("carol", "dn-b", 300_000),
                      ("dave", "dn-b", 200_000)]),
        ("m2", DAY1 + timedelta(hours=1), [("dave", "dn-b", 1_000_000)]),
    ]
    for request_id, when, weights in specs:
        res = result(request_id, "ad-1", 100, when)
        att = attribution(request_id, "ad-1", weights)
        events += [res, att, *split_fee(res, att, PARAMETERS, parameters_version=0,
                                        adapter_owner="olga",
                                        epoch=int(when.timestamp()) // 3600)]
    return events


def test_datanet_value_is_exact_for_a_contributor_in_two_datanets(client, database):
    events = mixed_events()
    LedgerWriter(client, database).write(events)
    expected: dict[str, int] = {}
    for e in events:
        if getattr(e, "role", None) == "contributor":
            expected[e.datanet_id] = expected.get(e.datanet_id, 0) + e.amount
    assert len({e.datanet_id for e in events if getattr(e, "role", None) == "contributor"}) == 2
    records = {r["datanet_id"]: r for r in queries.datanets(client, database).records()}
    assert {d: r["paid"] for d, r in records.items()} == expected
    # 5000 bps of 1000 = 500 for m1 (250 / 150 / 100) and 500 for m2, all dave's in dn-b.
    assert expected == {"dn-a": 250, "dn-b": 750}
    assert records["dn-b"]["contributors"] == 2


def test_datanet_value_in_one_epoch(client, database):
    LedgerWriter(client, database).write(mixed_events())
    epoch = int(DAY1.timestamp()) // 3600
    first = {r["datanet_id"]: r for r in queries.datanets(client, database, epoch=epoch).records()}
    assert {d: r["paid"] for d, r in first.items()} == {"dn-a": 250, "dn-b": 250}
    assert first["dn-b"]["contributors"] == 2 and first["dn-b"]["requests"] == 1
    assert first["dn-b"]["entries"] == 2
    second = queries.datanets(client, database, epoch=epoch + 1).records()
    assert [(r["datanet_id"], r["paid"], r["contributors"]) for r in second] == [("dn-b", 500, 1)]
    assert queries.datanets(client, database, epoch=epoch + 2).rows == []


def test_statement_shows_the_weight_of_each_datanet_entry(client, database):
    LedgerWriter(client, database).write(mixed_events())
    statement = queries.contributor_statement(client, "carol", database).records()
    assert [(r["datanets"], r["weight_ppm"], r["amount"]) for r in statement] == [
        ("dn-a", 500_000, 250), ("dn-b", 300_000, 150)]


def test_entries_without_a_datanet_are_stored_but_not_guessed_into_the_rollup(client, database):
    from schemas.events import RewardEntry, reward_entry_id

    res = result("old-1", "ad-1", 10)
    att = attribution("old-1", "ad-1", [("erin", "dn-a", 600_000), ("erin", "dn-b", 400_000)])
    legacy = RewardEntry(
        entry_id=reward_entry_id("old-1", "erin", "contributor"), request_id="old-1",
        adapter_id="ad-1", epoch=int(DAY1.timestamp()) // 3600, beneficiary_id="erin",
        role="contributor", amount=50, fee_total=100, parameters_version=0, created_at=DAY1,
    )
    inserted = LedgerWriter(client, database).write([res, att, legacy])
    assert inserted["reward_entries"] == 1
    paid = client.query(
        f"SELECT count() FROM {database}.value_by_datanet_epoch"
    ).result_rows[0][0]
    assert paid == 0
    (line,) = queries.contributor_statement(client, "erin", database).records()
    assert (line["datanets"], line["weight_ppm"], line["amount"]) == ("dn-a,dn-b", 1_000_000, 50)


def test_query_datanets_cli_by_epoch(client, database, monkeypatch):
    from typer.testing import CliRunner

    from loraledger.cli import app

    LedgerWriter(client, database).write(mixed_events())
    monkeypatch.setenv("CLICKHOUSE_URL", f"chdb://{Path(tempfile.gettempdir())}"
                                         f"/loraledger-test-chdb-{os.getpid()}")
    epoch = int(DAY1.timestamp()) // 3600 + 1
    output = CliRunner().invoke(app, ["query", "datanets", "--epoch", str(epoch), "-f", "json",
                                      "--database", database])
    assert output.exit_code == 0, output.output
    assert [(r["datanet_id"], r["paid"]) for r in json.loads(output.output)] == [("dn-b", 500)]
