"""`loraledger query ...`: governance and analytics reads of the ClickHouse ledger."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from infra.clickhouse_client import DEFAULT_DATABASE, apply_ddl, check_database, get_client
from infra.settings import load_settings
from pipeline import queries
from pipeline.queries import QueryResult
from schemas.ids import check_id

FORMATS = ("table", "json", "csv")

FormatOption = Annotated[
    str, typer.Option("--format", "-f", help="table (default), json or csv")
]
DatabaseOption = Annotated[
    str, typer.Option("--database", help="ClickHouse database holding the ledger")
]


def render(result: QueryResult, fmt: str) -> str | Table:
    """A query result as a rich table, JSON (a list of objects) or CSV with a header."""
    if fmt == "json":
        return json.dumps(result.records(), default=str, indent=2)
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(result.columns)
        writer.writerows(result.rows)
        return buffer.getvalue().rstrip("\n")
    table = Table(title=result.title)
    for column in result.columns:
        table.add_column(column, overflow="fold")
    for row in result.rows:
        table.add_row(*(str(value) for value in row))
    return table


def _print(result: QueryResult, fmt: str) -> None:
    output = render(result, fmt)
    if isinstance(output, str):
        typer.echo(output)
    else:
        Console().print(output)


def _run(fmt: str, database: str, query: Callable[..., QueryResult], **kwargs: Any) -> None:
    if fmt not in FORMATS:
        raise typer.BadParameter(f"unknown format {fmt!r}: use table, json or csv")
    try:
        check_database(database)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    client = get_client(load_settings())
    apply_ddl(client, database)  # a ledger nothing has written to yet reads as empty tables
    _print(query(client, database=database, **kwargs), fmt)


def _valid_id(value: str | None, what: str) -> str | None:
    if value is None:
        return None
    try:
        return check_id(value, what)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


def register(app: typer.Typer) -> None:
    group = typer.Typer(help="Read the ledger: rewards, usage, datanets, statements, proposals.",
                        no_args_is_help=True)
    app.add_typer(group, name="query")

    @group.command("rewards")
    def rewards(
        epoch: Annotated[int | None, typer.Option(help="only this epoch", min=0)] = None,
        beneficiary: Annotated[str | None, typer.Option(help="only this beneficiary")] = None,
        fmt: FormatOption = "table",
        database: DatabaseOption = DEFAULT_DATABASE,
    ) -> None:
        """Rewards per beneficiary per epoch and role."""
        _run(fmt, database, queries.rewards, epoch=epoch,
             beneficiary=_valid_id(beneficiary, "beneficiary id"))

    @group.command("usage")
    def usage(
        adapter: Annotated[str | None, typer.Option(help="only this adapter")] = None,
        fmt: FormatOption = "table",
        database: DatabaseOption = DEFAULT_DATABASE,
    ) -> None:
        """Requests, tokens and fees per adapter per day."""
        _run(fmt, database, queries.usage, adapter=_valid_id(adapter, "adapter id"))

    @group.command("datanets")
    def datanets(
        epoch: Annotated[int | None, typer.Option(
            help="only this epoch: requests, contributors and micro-units paid in it", min=0,
        )] = None,
        fmt: FormatOption = "table",
        database: DatabaseOption = DEFAULT_DATABASE,
    ) -> None:
        """Value per datanet: requests influenced, ppm mass and micro-units paid."""
        _run(fmt, database, queries.datanets, epoch=epoch)

    @group.command("contributor")
    def contributor(
        contributor_id: Annotated[str, typer.Argument(help="contributor id")],
        fmt: FormatOption = "table",
        database: DatabaseOption = DEFAULT_DATABASE,
    ) -> None:
        """A contributor's statement: each request that paid them, how much and why."""
        _run(fmt, database, queries.contributor_statement,
             contributor=_valid_id(contributor_id, "contributor id"))

    @group.command("proposals")
    def proposals(fmt: FormatOption = "table", database: DatabaseOption = DEFAULT_DATABASE
                  ) -> None:
        """Proposals with their votes, tallies and activations."""
        _run(fmt, database, queries.proposals)
