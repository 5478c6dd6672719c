"""`loraledger datanet create | add | snapshot | list | show | rebuild`.

The `datanets` and `contributions` topics are the truth and the local store is a fold of them
(`inference.datanets`), so `rebuild` makes the same store from the log alone. `create` and `add`
publish their events (`DatanetCreated`, `DatanetContribution`), wait for the broker to
acknowledge every one, and only then fold exactly those events into the local store, in the
order they were sent. If publishing fails, nothing is applied; if applying fails after the
publish, the store is behind the log, never ahead of it, and folding the topics catches it up.
Applying first would let the store credit rows the log never received (a failed publish), which
nothing downstream could ever see or repair.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from inference.datanets import (
    DEFAULT_LICENSE,
    ContributionOutcome,
    ContributionStatus,
    DatanetStore,
    parse_ref,
)
from infra.settings import load_settings
from schemas import DatanetContribution, DatanetCreated
from schemas.codec import DecodeError, parse_object

console = Console()
err_console = Console(stderr=True)
datanet_app = typer.Typer(
    help="Datanets: versioned datasets of contributed rows.", no_args_is_help=True
)


def _store() -> DatanetStore:
    return DatanetStore(load_settings().datanets_dir)


def _fail(message: str) -> typer.Exit:
    err_console.print(f"[red]error[/red] {message}")
    return typer.Exit(1)


def _publish(events: list[DatanetCreated] | list[DatanetContribution]) -> None:
    from infra.kafka.events import publish_sync

    settings = load_settings()
    try:
        publish_sync(settings, events)
    except Exception as exc:  # the broker is optional for local work: say how to skip it
        raise _fail(
            f"could not publish to Kafka at {settings.kafka_bootstrap} ({type(exc).__name__}); "
            "start it with `loraledger stack up` or pass --no-publish"
        ) from None


@datanet_app.command("create")
def create(
    name: str = typer.Argument(..., help="Datanet name: letters, digits, '.', '_' or '-'."),
    description: str = typer.Option("", "--description", help="What the datanet is for."),
    publish: bool = typer.Option(
        True, "--publish/--no-publish", help="Publish to the datanets topic before applying."
    ),
) -> None:
    """Create an empty datanet: publish a DatanetCreated event, then apply it locally."""
    store = _store()
    try:
        event = store.prepare_creation(name, description)
    except (ValueError, FileExistsError) as exc:
        raise _fail(str(exc)) from None
    if publish:
        _publish([event])
    info = store.apply(event)
    console.print(f"created datanet [bold]{info.datanet_id}[/bold]")


def read_rows_file(
    store: DatanetStore, datanet: str, contributor: str, license: str, path: Path
) -> list[DatanetContribution | ContributionOutcome]:
    """Validate every line of a JSONL file ({"text": ..., optional "license"}); a line that is
    not valid UTF-8 or JSON becomes a rejection, like any other invalid contribution."""
    prepared: list[DatanetContribution | ContributionOutcome] = []
    for number, raw in enumerate(path.read_bytes().splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            prepared.append(
                _rejection(datanet, contributor, f"line {number}: invalid UTF-8 ({exc})")
            )
            continue
        try:
            # The codec's parser: its limits keep a hostile line (deep nesting, a huge
            # number) a rejection like any other.
            record = parse_object(raw)
        except DecodeError as exc:
            prepared.append(_rejection(datanet, contributor, f"line {number}: {exc.reason}"))
            continue
        if not isinstance(record.get("text"), str):
            prepared.append(
                _rejection(datanet, contributor, f'line {number}: needs a "text" string')
            )
            continue
        prepared.append(
            store.prepare(datanet, contributor, record["text"], record.get("license", license))
        )
    return prepared


def _rejection(datanet: str, contributor: str, reason: str) -> ContributionOutcome:
    return ContributionOutcome(
        ContributionStatus.REJECTED, datanet, contributor, None, None, reason
    )


@datanet_app.command("add")
def add(
    name: str = typer.Argument(..., help="Datanet to contribute to."),
    contributor: str = typer.Option(..., "--contributor", help="Contributor id."),
    text: str | None = typer.Option(None, "--text", help="One row of text."),
    file: Annotated[
        Path | None,
        typer.Option(
            "--file", exists=True, dir_okay=False, help='JSONL rows: {"text": ..., "license": ...}'
        ),
    ] = None,
    license: str = typer.Option(
        DEFAULT_LICENSE, "--license", help="License of the rows (SPDX id)."
    ),
    publish: bool = typer.Option(
        True,
        "--publish/--no-publish",
        help="Publish to the contributions topic (acknowledged) before applying locally.",
    ),
) -> None:
    """Contribute rows: publish DatanetContribution events, then apply the published events
    to the local store."""
    if (text is None) == (file is None):
        raise typer.BadParameter("give exactly one of --text or --file")
    store = _store()
    if text is not None:
        prepared = [store.prepare(name, contributor, text, license)]
    else:
        assert file is not None
        prepared = read_rows_file(store, name, contributor, license, file)
    events = [item for item in prepared if isinstance(item, DatanetContribution)]
    if events and publish:
        _publish(events)
    accepted = rejected = 0
    for item in prepared:
        try:
            if isinstance(item, DatanetContribution):
                outcome = store.apply(item)
            else:
                outcome = store.record_rejection(item)
        except OSError as exc:
            behind = " (it is behind the contributions topic)" if events and publish else ""
            raise _fail(f"the local store could not apply a contribution{behind}: {exc}") from None
        if outcome.accepted:
            accepted += 1
        else:
            rejected += 1
            err_console.print(f"[yellow]rejected[/yellow] {escape(outcome.reason or '')}")
    console.print(f"{name}: {accepted} accepted, {rejected} rejected")


@datanet_app.command("snapshot")
def snapshot(name: str = typer.Argument(..., help="Datanet to freeze.")) -> None:
    """Write the next immutable Parquet snapshot (or report the latest if nothing changed)."""
    try:
        manifest = _store().snapshot(name)
    except (KeyError, ValueError) as exc:
        raise _fail(str(exc).strip("'\"")) from None
    console.print(
        f"{name}@{manifest.version}: {manifest.rows} rows, {len(manifest.contributors)} "
        f"contributors, hash {manifest.snapshot_hash}"
    )


@datanet_app.command("list")
def list_datanets() -> None:
    """Datanets with their row, rejection and snapshot counts."""
    table = Table("datanet", "rows", "rejected", "contributors", "snapshots", "description")
    for info in _store().list():
        snapshots = ", ".join(f"v{v}" for v in info.snapshots) or "-"
        table.add_row(
            info.datanet_id, str(info.rows), str(info.rejected), str(len(info.contributors)),
            snapshots, info.description,
        )  # fmt: skip
    console.print(table)


@datanet_app.command("show")
def show(ref: str = typer.Argument(..., help="NAME or NAME@VERSION.")) -> None:
    """A datanet's state, or one snapshot's manifest."""
    store = _store()
    try:
        name, version = parse_ref(ref)
        if version is None:
            info = store.info(name)
            console.print_json(
                json.dumps(
                    {
                        "datanet_id": info.datanet_id,
                        "description": info.description,
                        "rows": info.rows,
                        "rejected": info.rejected,
                        "contributors": info.contributors,
                        "snapshots": info.snapshots,
                    }
                )
            )
        else:
            console.print_json(store.manifest(name, version).to_json())
    except (KeyError, ValueError) as exc:
        raise _fail(str(exc).strip("'\"")) from None


@datanet_app.command("rebuild")
def rebuild() -> None:
    """Fold the datanets and contributions topics into the local store (idempotent): a fresh
    LORALEDGER_HOME gets every datanet back from the log alone."""
    import asyncio

    from infra.kafka.events import read_topic

    settings = load_settings()

    async def read_log() -> list[DatanetCreated | DatanetContribution]:
        return [
            decoded.event
            for topic in ("datanets", "contributions")
            async for decoded in read_topic(settings, topic)
            if decoded.event is not None
        ]

    try:
        events = asyncio.run(read_log())
    except Exception as exc:
        raise _fail(
            f"could not read the log from Kafka at {settings.kafka_bootstrap} "
            f"({type(exc).__name__}); start it with `loraledger stack up`"
        ) from None
    store = _store()
    store.rebuild(events)
    console.print(f"rebuilt {len(store.names())} datanets from {len(events)} events")


def register(app: typer.Typer) -> None:
    app.add_typer(datanet_app, name="datanet")
