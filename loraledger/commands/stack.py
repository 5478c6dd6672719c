"""`loraledger stack up | down | status`."""

from __future__ import annotations

import typer
from rich.console import Console

from infra.kafka.broker import StackError, broker_nodes, cluster_bootstrap, stop_broker
from infra.kafka.provisioning import ProvisioningError
from infra.kafka.security import CredentialsError, scram_enabled
from infra.ledger_server.process import stop_ledger
from infra.settings import load_settings, redact_url
from infra.stack import stack_status, stack_up

console = Console()
stack_app = typer.Typer(
    help="Start, stop and inspect the local stack (Kafka broker, ledger server)."
)


@stack_app.command("up")
def up(
    external: bool = typer.Option(
        False, "--external", help="Use the broker at KAFKA_BOOTSTRAP; start none locally."
    ),
    brokers: int = typer.Option(
        1, "--brokers", min=1, help="Local KRaft nodes: 3 makes a cluster on loopback."
    ),
) -> None:
    """Start the local Kafka broker (or cluster) and ledger server, create the topics,
    provision the principals (password files, SCRAM credentials, ACLs) and apply the ClickHouse
    DDL. Nodes already running are kept."""
    settings = load_settings()
    try:
        with console.status("starting the stack"):
            created = stack_up(settings, start_local_broker=not external, brokers=brokers)
    except (StackError, CredentialsError, ProvisioningError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from None
    security = (f"principals provisioned, credentials in {settings.credentials_dir}"
                if scram_enabled(settings) else "PLAINTEXT: no authentication, no ACLs")
    console.print(
        f"stack up: broker {settings.kafka_bootstrap} ({security}), {len(created)} topics "
        f"created, ClickHouse {redact_url(settings.clickhouse_url)}"
    )
    if brokers > 1 and not external:
        everyone = cluster_bootstrap(broker_nodes(settings, brokers))
        console.print(f"a cluster of {brokers}: clients should use KAFKA_BOOTSTRAP={everyone}")


@stack_app.command("down")
def down() -> None:
    """Stop the local Kafka broker or cluster and the ledger server (their data stays under
    LORALEDGER_HOME)."""
    settings = load_settings()
    stopped = stop_broker(settings)
    console.print("broker stopped" if stopped else "no local broker was running")
    if stop_ledger(settings):
        console.print("ledger server stopped")


@stack_app.command("status")
def status() -> None:
    """Report each broker node, the quorum's leader, the topics and any under-replicated
    partitions."""
    state = stack_status(load_settings())
    console.print(f"security: {state.security}")
    for node in state.nodes:
        pid = node.pid if node.pid is not None else "-"
        answers = "[green]answers[/green]" if node.answers else "[red]does not answer[/red]"
        console.print(f"broker {node.node_id} {node.address}: pid {pid}, {answers}")
    if len(state.nodes) > 1:
        console.print(f"controller: {state.controller if state.controller is not None else '-'}")
        console.print(f"under-replicated: {', '.join(state.under_replicated) or 'none'}")
    console.print(f"topics: {', '.join(state.topics) or '-'}")
    if state.local_ledger:
        pid = state.ledger_pid if state.ledger_pid is not None else "-"
        answers = ("[green]answers[/green]" if state.ledger_answers
                   else "[red]does not answer[/red]")
        console.print(f"ledger server {state.clickhouse_url}: pid {pid}, {answers}")
    else:
        console.print(f"clickhouse: {state.clickhouse_url}")
    if not state.answers or (state.local_ledger and not state.ledger_answers):
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.add_typer(stack_app, name="stack")
