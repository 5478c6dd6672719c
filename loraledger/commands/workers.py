"""`loraledger workers register`: bind a worker id to the key its results are signed with."""

from __future__ import annotations

from typing import Annotated

import typer

from infra.kafka.events import publish_sync
from infra.kafka.security import WORKER
from infra.keys import KeyRole, key_path, worker_registration
from infra.settings import load_settings
from schemas.ids import check_id


def register(app: typer.Typer) -> None:
    group = typer.Typer(help="Register GPU workers' signing keys.", no_args_is_help=True)
    app.add_typer(group, name="workers")

    @group.command("register")
    def register_worker(
        worker_id: Annotated[str | None, typer.Option(
            "--worker-id", help="Worker to register [LORALEDGER_WORKER_ID].")] = None,
    ) -> None:
        """Make the worker's key (kept if it exists, mode 0600 under LORALEDGER_HOME) and
        publish its public half on `workers`: results signed with it are credited to the
        worker. The first key registered for an id is the one that counts. Runs as the
        worker principal: only it (and the admin, at `stack up`) may write `workers`."""
        settings = load_settings().acting_as(WORKER)
        try:
            identity = check_id(worker_id or settings.worker_id, "worker id")
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from None
        event = worker_registration(settings.home, identity)
        publish_sync(settings, [event])
        path = key_path(settings.home, KeyRole.WORKER, identity)
        typer.echo(f"worker {identity} registered with key {event.public_key} ({path})")
