"""Rebuild the ClickHouse ledger from the Kafka log, the source of truth.

`replay_into` reads results, attributions, rewards and governance (inputs and decisions) from
the beginning (committed records only) into a fresh database through the same LedgerWriter the
sink uses, so base tables and materialized rollups are rebuilt together. `promote` then
replaces the live database's contents with the rebuilt ones; stop the sink while it runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from clickhouse_connect.driver.client import Client

from infra.clickhouse_client import DEFAULT_DATABASE, apply_ddl, check_database, drop_database
from infra.kafka.events import read_topic
from infra.settings import Settings
from pipeline.ledger import LEDGER_EVENTS, TABLES, LedgerWriter

REPLAY_TOPICS = (
    "results", "attributions", "rewards", "governance", "governance-decisions",
)
ROLLUP_TABLES = (
    "rewards_by_beneficiary_epoch",
    "usage_by_adapter_day",
    "attribution_by_contributor",
    "value_by_datanet",
    "value_by_datanet_epoch",
)


@dataclass
class ReplayReport:
    database: str
    records: dict[str, int] = field(default_factory=dict)  # records read per topic
    skipped: dict[str, int] = field(default_factory=dict)  # undecodable records per topic
    inserted: dict[str, int] = field(default_factory=dict)  # rows inserted per table


async def replay_into(
    settings: Settings,
    client: Client,
    database: str,
    *,
    batch_size: int = 5000,
    idle_timeout_s: float = 3.0,
) -> ReplayReport:
    """Rebuild every ledger table of `database` (created if missing) from the Kafka log."""
    check_database(database)
    apply_ddl(client, database)
    writer = LedgerWriter(client, database)
    report = ReplayReport(database)

    def flush(batch: list) -> None:
        for table, count in writer.write(batch).items():
            report.inserted[table] = report.inserted.get(table, 0) + count
        batch.clear()

    for name in REPLAY_TOPICS:
        batch: list = []
        read = skipped = 0
        async for decoded in read_topic(settings, name, idle_timeout_s=idle_timeout_s):
            read += 1
            if decoded.event is None:
                skipped += 1
            elif isinstance(decoded.event, LEDGER_EVENTS):
                batch.append(decoded.event)
                if len(batch) >= batch_size:
                    flush(batch)
        flush(batch)
        report.records[name], report.skipped[name] = read, skipped
    return report


def promote(client: Client, source: str, target: str = DEFAULT_DATABASE) -> None:
    """Replace `target`'s ledger with `source`'s: recreate `target`, copy the base tables
    (their materialized views rebuild the rollups) and drop `source`."""
    check_database(source)
    check_database(target)
    if source == target:
        raise ValueError(f"cannot promote database {source} onto itself")
    drop_database(client, target)
    apply_ddl(client, target)
    for table, spec in TABLES.items():
        columns = ", ".join(spec.columns)
        client.command(
            f"INSERT INTO {target}.{table} ({columns}) SELECT {columns} FROM {source}.{table} FINAL"
        )
    drop_database(client, source)


def table_fingerprint(client: Client, database: str, table: str) -> list[tuple]:
    """A table's rows in a canonical order, deduplicated and with rollups merged, for comparing
    a rebuilt ledger with the live one."""
    check_database(database)
    if table == "value_by_datanet":
        sql = (f"SELECT datanet_id, uniqExactMerge(requests), uniqExactMerge(contributors), "
               f"sum(ppm_total) FROM {database}.{table} GROUP BY datanet_id ORDER BY datanet_id")
    elif table == "value_by_datanet_epoch":
        sql = (f"SELECT epoch, datanet_id, sum(paid), sum(entries), uniqExactMerge(requests), "
               f"uniqExactMerge(contributors) FROM {database}.{table} GROUP BY epoch, datanet_id "
               f"ORDER BY epoch, datanet_id")
    elif table in ROLLUP_TABLES:
        keys = {
            "rewards_by_beneficiary_epoch": ("epoch, beneficiary_id, role", "amount, entries"),
            "usage_by_adapter_day": (
                "adapter_id, day",
                "requests, errors, prompt_tokens, completion_tokens, fees",
            ),
            "attribution_by_contributor": ("contributor_id, datanet_id", "requests, ppm_total"),
        }[table]
        sums = ", ".join(f"sum({column})" for column in keys[1].split(", "))
        sql = (f"SELECT {keys[0]}, {sums} FROM {database}.{table} GROUP BY {keys[0]} "
               f"ORDER BY {keys[0]}")
    else:
        columns = ", ".join(TABLES[table].columns)
        sql = f"SELECT {columns} FROM {database}.{table} FINAL ORDER BY {columns}"
    return list(client.query(sql).result_rows)
