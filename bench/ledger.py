"""Ledger benchmark on the embedded engine: insert rate into the ledger tables (with their
materialized rollups) and the latency of each governance query at N reward entries.

Rows are generated inside ClickHouse (INSERT ... SELECT FROM numbers()), five entries per
request (two contributors, each naming their datanet, owner, operator, treasury) with one
result, one attribution record and two contributor rows per request, over 100 epochs, 1000
adapters and 20 datanets. The writer path the
sink uses (Python events -> LedgerWriter) is measured separately on a smaller batch.

    python bench/ledger.py [--rows 10000000] [--dir DIR] [--out bench/results/ledger.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from infra.clickhouse_client import apply_ddl, get_client
from infra.settings import load_settings
from pipeline import queries
from pipeline.ledger import LedgerWriter
from pipeline.rewards import split_fee
from schemas.events import (
    AttributionRecord,
    ContributorWeight,
    InferenceResult,
    MethodInfo,
    Parameters,
    Usage,
)

DATABASE = "bench_ledger"
FIRST_EPOCH = 490_000
EPOCHS = 100
CHUNK = 2_000_000

# Per generated number n: request r = n / 5 and slot k = n % 5 decide role and beneficiary.
REWARD_SELECT = """
SELECT
    lower(hex(substring(SHA256(concat(request_id, beneficiary_id, role, datanet_id)), 1, 16)))
        AS entry_id,
    request_id, adapter_id, epoch, beneficiary_id, role, amount, toUInt64(500) AS fee_total,
    toUInt32(0) AS parameters_version, '' AS reason,
    toDateTime64(epoch * 3600 + r % 3600, 3, 'UTC') AS created_at, datanet_id
FROM (
    SELECT
        intDiv(number, 5) AS r, number % 5 AS k,
        concat('req-', toString(r)) AS request_id,
        concat('ad-', toString(r % 1000)) AS adapter_id,
        toUInt64({first_epoch:UInt64} + intDiv(r * {epochs:UInt64}, {requests:UInt64})) AS epoch,
        multiIf(k = 0, concat('c', toString(r % 50000)),
                k = 1, concat('c', toString((r * 7 + 1) % 50000)),
                k = 2, concat('owner-', toString(r % 100)),
                k = 3, concat('gpu-', toString(r % 8)), 'treasury') AS beneficiary_id,
        ['contributor', 'contributor', 'adapter_owner', 'compute_operator', 'treasury'][k + 1]
            AS role,
        if(k < 2, concat('dn-', toString(cityHash64(beneficiary_id) % 20)), '') AS datanet_id,
        toUInt64(1 + cityHash64(number) % 200) AS amount
    FROM numbers({start:UInt64}, {count:UInt64})
)
"""

REQUEST_SELECTS = {
    "inference_results": """
SELECT concat('req-', toString(number)), concat('ad-', toString(number % 1000)),
       concat('gpu-', toString(number % 8)), 'ok', '', toUInt32(20 + number % 50),
       toUInt32(10 + number % 30), 12.5, 'device', '',
       toDateTime64(({first_epoch:UInt64} + intDiv(number * {epochs:UInt64},
                     {requests:UInt64})) * 3600 + number % 3600, 3, 'UTC')
FROM numbers({start:UInt64}, {count:UInt64})""",
    "attributions": """
SELECT concat('req-', toString(number)), concat('ad-', toString(number % 1000)), 'ok', '',
       'trak', '1', '', '', toUInt32(2),
       toDateTime64(({first_epoch:UInt64} + intDiv(number * {epochs:UInt64},
                     {requests:UInt64})) * 3600 + number % 3600, 3, 'UTC')
FROM numbers({start:UInt64}, {count:UInt64})""",
    "attribution_rows": """
SELECT concat('req-', toString(r)), contributor,
       concat('dn-', toString(cityHash64(contributor) % 20)),
       concat('ad-', toString(r % 1000)), toUInt32(if(number % 2 = 0, 700000, 300000)), 'trak',
       toDateTime64(({first_epoch:UInt64} + intDiv(r * {epochs:UInt64},
                     {requests:UInt64})) * 3600 + r % 3600, 3, 'UTC')
FROM (SELECT number, intDiv(number, 2) AS r,
             if(number % 2 = 0, concat('c', toString(r % 50000)),
                concat('c', toString((r * 7 + 1) % 50000))) AS contributor
      FROM numbers({start:UInt64}, {count:UInt64}))""",
}

COLUMNS = {
    "inference_results": "request_id, adapter_id, worker_id, status, error_code, prompt_tokens, "
                         "completion_tokens, total_ms, cache_tier, adapter_hash, created_at",
    "attributions": "request_id, adapter_id, status, failure_reason, method, method_version, "
                    "index_hash, evidence_hash, contributors, created_at",
    "attribution_rows": "request_id, contributor_id, datanet_id, adapter_id, ppm, method, "
                        "created_at",
    "reward_entries": "entry_id, request_id, adapter_id, epoch, beneficiary_id, role, amount, "
                      "fee_total, parameters_version, reason, created_at, datanet_id",
}


def bulk_insert(client, table: str, select: str, total: int, requests: int) -> dict:
    started = time.perf_counter()
    for start in range(0, total, CHUNK):
        client.command(
            f"INSERT INTO {DATABASE}.{table} ({COLUMNS[table]}) {select}",
            parameters={"start": start, "count": min(CHUNK, total - start),
                        "first_epoch": FIRST_EPOCH, "epochs": EPOCHS, "requests": requests},
        )
    seconds = time.perf_counter() - started
    return {"table": table, "rows": total, "seconds": round(seconds, 3),
            "rows_per_s": round(total / seconds)}


def writer_path(client, requests: int) -> dict:
    """Events through LedgerWriter, as the sink writes them (dedup lookups included)."""
    parameters = Parameters()
    events = []
    when = datetime.fromtimestamp((FIRST_EPOCH + EPOCHS) * 3600, UTC)
    for index in range(requests):
        result = InferenceResult(
            request_id=f"w-{index}", adapter_id=f"ad-{index % 1000}", status="ok",
            usage=Usage(prompt_tokens=20, completion_tokens=10), worker_id="gpu-0",
            created_at=when,
        )
        attribution = AttributionRecord(
            request_id=f"w-{index}", adapter_id=result.adapter_id, status="ok",
            method=MethodInfo(name="trak", version="1"), evidence_hash="0" * 64,
            contributor_weights=[
                ContributorWeight(contributor_id=f"c{index % 500}", datanet_id="dn-1",
                                  ppm=700_000),
                ContributorWeight(contributor_id=f"c{(index + 1) % 500}", datanet_id="dn-2",
                                  ppm=300_000),
            ],
        )
        events += [result, attribution,
                   *split_fee(result, attribution, parameters, parameters_version=0,
                              adapter_owner="owner-1", epoch=FIRST_EPOCH + EPOCHS)]
    writer = LedgerWriter(client, DATABASE)
    started = time.perf_counter()
    for start in range(0, len(events), 1000):  # the sink's batch size
        writer.write(events[start:start + 1000])
    seconds = time.perf_counter() - started
    return {"table": "all (LedgerWriter, batches of 1000 events)", "rows": len(events),
            "seconds": round(seconds, 3), "rows_per_s": round(len(events) / seconds)}


def time_query(name: str, run, repeats: int) -> dict:
    timings = []
    rows = 0
    for _ in range(repeats):
        started = time.perf_counter()
        rows = len(run().rows)
        timings.append((time.perf_counter() - started) * 1000)
    return {"query": name, "rows": rows, "median_ms": round(statistics.median(timings), 1),
            "min_ms": round(min(timings), 1), "max_ms": round(max(timings), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000, help="reward entries")
    parser.add_argument("--writer-requests", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", type=Path, default=None, help="chdb directory (default: temp)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/ledger.json"))
    args = parser.parse_args()
    if args.rows < 5 or args.rows % 5:
        parser.error("--rows must be a positive multiple of 5 (five entries per request)")

    directory = args.dir or Path(tempfile.mkdtemp(prefix="ledger-bench-"))
    client = get_client(load_settings({"CLICKHOUSE_URL": f"chdb://{directory.resolve()}"}))
    client.command("DROP DATABASE IF EXISTS {db:Identifier} SYNC", parameters={"db": DATABASE})
    apply_ddl(client, DATABASE)
    requests = args.rows // 5

    inserts = [bulk_insert(client, "reward_entries", REWARD_SELECT, args.rows, requests)]
    inserts += [
        bulk_insert(client, table, select, requests * (2 if table == "attribution_rows" else 1),
                    requests)
        for table, select in REQUEST_SELECTS.items()
    ]
    inserts.append(writer_path(client, args.writer_requests))

    mid_epoch = FIRST_EPOCH + EPOCHS // 2
    runs = {
        "rewards (all epochs)": lambda: queries.rewards(client, DATABASE),
        "rewards --epoch E": lambda: queries.rewards(client, DATABASE, epoch=mid_epoch),
        "rewards --beneficiary B": lambda: queries.rewards(client, DATABASE, beneficiary="c123"),
        "usage": lambda: queries.usage(client, DATABASE),
        "usage --adapter A": lambda: queries.usage(client, DATABASE, adapter="ad-7"),
        "datanets": lambda: queries.datanets(client, DATABASE),
        "datanets --epoch E": lambda: queries.datanets(client, DATABASE, epoch=mid_epoch),
        "contributor C (statement)": lambda: queries.contributor_statement(client, "c123",
                                                                           DATABASE),
        "proposals": lambda: queries.proposals(client, DATABASE),
    }
    latencies = [time_query(name, run, args.repeats) for name, run in runs.items()]
    size = client.query(
        "SELECT sum(bytes_on_disk) FROM system.parts WHERE database = {db:String} AND active",
        parameters={"db": DATABASE},
    ).result_rows[0][0]

    report = {"engine": "chdb (embedded)", "reward_entries": args.rows, "requests": requests,
              "bytes_on_disk": int(size), "inserts": inserts, "queries": latencies,
              "measured_at": datetime.now(UTC).isoformat(timespec="seconds")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))

    print(f"## Ledger on chdb: {args.rows:,} reward entries, {requests:,} requests, "
          f"{size / 2**20:,.0f} MiB on disk\n")
    print("| insert into | rows | seconds | rows/s |\n| --- | ---: | ---: | ---: |")
    for row in inserts:
        print(f"| {row['table']} | {row['rows']:,} | {row['seconds']} | {row['rows_per_s']:,} |")
    print("\n| query | rows | median ms | min ms | max ms |\n| --- | ---: | ---: | ---: | ---: |")
    for row in latencies:
        print(f"| {row['query']} | {row['rows']:,} | {row['median_ms']} | {row['min_ms']} "
              f"| {row['max_ms']} |")
    client.command("DROP DATABASE IF EXISTS {db:Identifier} SYNC", parameters={"db": DATABASE})
    if args.dir is None:
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
