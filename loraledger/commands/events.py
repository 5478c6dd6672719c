"""`loraledger produce`, `loraledger tail` and `loraledger schemas export`."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from pathlib import Path

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from infra.kafka.events import publish_sync, read_topic
from infra.settings import load_settings
from schemas.codec import DecodeError, decode
from schemas.events import InferenceRequest
from schemas.export import export_json_schemas
from schemas.topics import TOPICS

console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)


def parse_request_lines(
    lines: Sequence[bytes | str],
) -> tuple[list[InferenceRequest], list[str]]:
    """Parse JSONL requests; returns the valid ones and one message per invalid line (a line
    that is not UTF-8 included: lines are decoded one by one)."""
    requests: list[InferenceRequest] = []
    problems: list[str] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        raw = line if isinstance(line, bytes) else line.encode("utf-8")
        try:
            requests.append(decode("requests", raw))
        except DecodeError as exc:
            problems.append(f"line {number}: {exc.reason}")
    return requests, problems


def produce(
    adapter: str | None = typer.Option(None, "--adapter", help="Adapter id to run the prompt on."),
    prompt: str | None = typer.Option(None, "--prompt", help="Prompt text."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1, help="Tokens to generate."),
    temperature: float = typer.Option(0.0, "--temperature", help="0 for greedy decoding."),
    seed: int = typer.Option(0, "--seed", min=0, help="Sampling seed."),
    count: int = typer.Option(1, "--count", min=1, help="How many identical requests to send."),
    file: Path | None = typer.Option(
        None, "--file", exists=True, dir_okay=False, help="JSONL file of requests, one per line."
    ),
) -> None:
    """Publish InferenceRequests to the `requests` topic."""
    settings = load_settings()
    if file is not None:
        if adapter or prompt:
            raise typer.BadParameter("give either --file or --adapter/--prompt, not both")
        requests, problems = parse_request_lines(file.read_bytes().splitlines())
        for problem in problems:
            err_console.print(f"[yellow]skipped[/yellow] {escape(f'{file}:{problem}')}")
    else:
        if not adapter or not prompt:
            raise typer.BadParameter("give --adapter and --prompt (or --file requests.jsonl)")
        try:
            requests = [
                InferenceRequest(
                    adapter_id=adapter,
                    prompt=prompt,
                    max_new_tokens=max_new_tokens,
                    temperature=temperature,
                    seed=seed,
                )
                for _ in range(count)
            ]
        except ValidationError as exc:
            error = exc.errors(include_url=False)[0]
            field = ".".join(str(part) for part in error["loc"])
            raise typer.BadParameter(f"{field}: {error['msg']}") from None
    sent = publish_sync(settings, requests)
    console.print(f"sent {sent} request(s) to {settings.topic_prefix}requests")
    for request in requests[:5]:
        console.print(f"  {request.request_id}  adapter={request.adapter_id}")


def tail(
    topic: str = typer.Argument(..., help=f"One of: {', '.join(TOPICS)}."),
    limit: int = typer.Option(20, "--limit", min=1, help="Stop after this many events."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object per line."),
    idle_timeout: float = typer.Option(3.0, "--idle-timeout", help="Seconds to wait for more."),
) -> None:
    """Print decoded events of a topic, from the beginning (committed data only)."""
    if topic not in TOPICS:
        raise typer.BadParameter(f"unknown topic {topic!r}: use one of {', '.join(TOPICS)}")
    settings = load_settings()

    async def collect() -> list:
        return [item async for item in read_topic(settings, topic, limit=limit,
                                                  idle_timeout_s=idle_timeout)]

    items = asyncio.run(collect())
    if as_json:
        for item in items:
            if item.event is not None:
                print(item.event.model_dump_json())
            else:
                print(json.dumps({"invalid": item.error, "offset": item.record.offset}))
        return
    table = Table(title=f"{settings.topic_prefix}{topic}")
    for column in ("partition", "offset", "key", "event"):
        table.add_column(column, overflow="fold")
    for item in items:
        # Event text is anyone's: escaped, so that brackets in it are not read as markup.
        summary = (
            escape(item.event.model_dump_json(exclude_defaults=True)[:160])
            if item.event is not None
            else f"[red]invalid:[/red] {escape(item.error or '')}"
        )
        key = escape((item.record.key or b"").decode("utf-8", "replace"))
        table.add_row(str(item.record.partition), str(item.record.offset), key, summary)
    console.print(table)


schemas_app = typer.Typer(help="Event schemas.")


@schemas_app.command("export")
def export(
    directory: Path = typer.Argument(..., help="Directory to write *.schema.json to."),
) -> None:
    """Write a JSON Schema for every event."""
    written = export_json_schemas(directory)
    console.print(f"wrote {len(written)} schemas to {directory}")


def register(app: typer.Typer) -> None:
    app.command("produce")(produce)
    app.command("tail")(tail)
    app.add_typer(schemas_app, name="schemas")
