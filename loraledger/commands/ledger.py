"""`loraledger ledger serve`: the ledger server in the foreground."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

from infra.ledger_server.ownership import DirectoryInUse
from infra.ledger_server.server import LedgerServerError, serve
from infra.settings import LEDGER_HOST, load_settings

console = Console(stderr=True)
ledger_app = typer.Typer(
    help="The ledger server: ClickHouse's HTTP interface over the embedded ledger, so any "
    "number of processes and ClickHouse clients read it while the pipeline writes.",
    no_args_is_help=True,
)


@ledger_app.command("serve")
def serve_command(
    host: Annotated[str, typer.Option(help="address to listen on")] = LEDGER_HOST,
    port: Annotated[int | None, typer.Option(
        help="port (default: LORALEDGER_LEDGER_PORT)", min=1, max=65535)] = None,
) -> None:
    """Own $LORALEDGER_HOME/clickhouse and serve it until Ctrl-C or SIGTERM
    (`loraledger stack up` runs this in the background)."""
    settings = load_settings()
    try:
        serve(settings.ledger_dir, host=host, port=port or settings.ledger_port,
              password=settings.ledger_password)
    except (DirectoryInUse, LedgerServerError) as exc:
        console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None


def register(app: typer.Typer) -> None:
    app.add_typer(ledger_app, name="ledger")
