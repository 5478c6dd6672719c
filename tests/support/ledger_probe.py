"""Reads of the ledger for integration tests, in a process of their own: the embedded ClickHouse
engine serves one directory per process, and the pipeline under test holds it while it runs.

    python tests/support/ledger_probe.py apply-ddl
    python tests/support/ledger_probe.py counts
    python tests/support/ledger_probe.py ids TABLE
    python tests/support/ledger_probe.py compare DATABASE
    python tests/support/ledger_probe.py earnings
    python tests/support/ledger_probe.py proposals

Settings come from the environment, as the pipeline's do; each command prints one JSON line.
`command(...)` gives the argument list to run one."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from infra.clickhouse_client import DEFAULT_DATABASE, apply_ddl, get_client
from infra.settings import load_settings

# table -> the column that identifies a row
IDENTIFIED_BY = {
    "inference_results": "request_id",
    "attributions": "request_id",
    "reward_entries": "entry_id",
}


def command(*args: str) -> list[str]:
    """The command line that runs this probe with `args`."""
    return [sys.executable, str(Path(__file__).resolve()), *args]


def counts() -> dict[str, list[int]]:
    """Rows and distinct ids per ledger table: equal when no row is stored twice."""
    client = get_client(load_settings())
    found = {}
    for table, column in IDENTIFIED_BY.items():
        rows, distinct = client.query(
            f"SELECT count(), uniqExact({column}) FROM {DEFAULT_DATABASE}.{table}"
        ).result_rows[0]
        found[table] = [int(rows), int(distinct)]
    return found


def ids(table: str) -> list[str]:
    """The identifying column of every row of one ledger table, sorted."""
    column = IDENTIFIED_BY[table]
    rows = get_client(load_settings()).query(
        f"SELECT {column} FROM {DEFAULT_DATABASE}.{table} ORDER BY {column}"
    ).result_rows
    return [row[0] for row in rows]


def earnings() -> list[list]:
    """[beneficiary, epoch, micro-units] per beneficiary and epoch, each entry counted once."""
    client = get_client(load_settings())
    return [list(row) for row in client.query(
        f"SELECT beneficiary_id, epoch, sum(amount) FROM {DEFAULT_DATABASE}.reward_entries "
        "FINAL GROUP BY beneficiary_id, epoch ORDER BY beneficiary_id, epoch"
    ).result_rows]


def compare(other: str) -> dict:
    """Whether every table of `other` equals the live ledger's, row counts, and the proposals."""
    from pipeline import queries
    from pipeline.ledger import TABLES
    from pipeline.replay import ROLLUP_TABLES, table_fingerprint

    client = get_client(load_settings())
    tables = [*TABLES, *ROLLUP_TABLES]
    return {
        "equal": {
            table: table_fingerprint(client, DEFAULT_DATABASE, table)
            == table_fingerprint(client, other, table)
            for table in tables
        },
        "rows": {
            table: len(table_fingerprint(client, DEFAULT_DATABASE, table)) for table in tables
        },
        "proposals": queries.proposals(client, DEFAULT_DATABASE).records(),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("apply-ddl", help="create the ledger's tables")
    commands.add_parser("counts", help="rows and distinct ids per table")
    listed = commands.add_parser("ids", help="the identifying column of one table's rows")
    listed.add_argument("table", choices=sorted(IDENTIFIED_BY))
    commands.add_parser("earnings", help="reward entry sums per beneficiary and epoch")
    compared = commands.add_parser("compare", help="compare a rebuilt ledger with the live one")
    compared.add_argument("database")
    commands.add_parser("proposals", help="the ledger's view of the proposals")
    args = parser.parse_args(argv)
    if args.command == "apply-ddl":
        apply_ddl(get_client(load_settings()), DEFAULT_DATABASE)
        print(json.dumps({"applied": DEFAULT_DATABASE}))
    elif args.command == "counts":
        print(json.dumps(counts()))
    elif args.command == "ids":
        print(json.dumps(ids(args.table)))
    elif args.command == "earnings":
        print(json.dumps(earnings()))
    elif args.command == "proposals":
        from pipeline import queries

        proposals = queries.proposals(get_client(load_settings()), DEFAULT_DATABASE).records()
        print(json.dumps(proposals, default=str))
    else:
        print(json.dumps(compare(args.database), default=str))


if __name__ == "__main__":
    main()
