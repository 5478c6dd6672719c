"""`loraledger replay`: rebuild the ClickHouse ledger from the Kafka log."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Annotated

import typer

from infra.clickhouse_client import DEFAULT_DATABASE, check_database, get_client
from infra.settings import load_settings
from pipeline.replay import promote, replay_into


def register(app: typer.Typer) -> None:
    @app.command("replay")
    def replay(
        into: Annotated[str | None, typer.Option(
            "--into", help="database to rebuild into (default: <live>_replay_<UTC time>)")] = None,
        live: Annotated[str, typer.Option("--live", help="the live ledger database")] = (
            DEFAULT_DATABASE
        ),
        swap: Annotated[bool, typer.Option(
            "--swap", help="then replace the live ledger with the rebuilt one (stop the sink "
            "first)")] = False,
    ) -> None:
        """Rebuild every ledger table from the Kafka log into a fresh database."""
        target = into or f"{live}_replay_{datetime.now(UTC):%Y%m%d%H%M%S}"
        try:
            check_database(target)
            check_database(live)
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from None
        if target == live:
            raise typer.BadParameter("--into must differ from --live: replay builds a fresh copy")
        client = get_client(load_settings())
        if target in {row[0] for row in client.query("SHOW DATABASES").result_rows}:
            raise typer.BadParameter(f"database {target} exists: choose a fresh --into")
        report = asyncio.run(replay_into(load_settings(), client, target))
        for topic, count in report.records.items():
            typer.echo(f"{topic}: {count} records read, {report.skipped[topic]} undecodable")
        for table, count in sorted(report.inserted.items()):
            typer.echo(f"{target}.{table}: {count} rows")
        if swap:
            promote(client, target, live)
            typer.echo(f"promoted {target} to {live}")
