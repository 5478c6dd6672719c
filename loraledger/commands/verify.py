"""`loraledger verify REQUEST_ID`: recompute a request's sketch and attribution from the log and
the stored artifacts; exit 0 on a match, 1 on a difference, 2 when the request is not found."""

from __future__ import annotations

import json
from dataclasses import asdict

import typer

from infra.settings import load_settings
from schemas.ids import check_id


def register(app: typer.Typer) -> None:
    @app.command("verify")
    def verify(
        request_id: str = typer.Argument(..., help="The request id to verify."),
        skip_sketch: bool = typer.Option(
            False, "--skip-sketch", help="Do not recompute the sketch (no base model needed)."
        ),
        as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    ) -> None:
        """Recompute a request's attribution and report `match` or the first difference."""
        from pipeline.verify import verify_request

        try:
            check_id(request_id, "request id")
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from None
        report = verify_request(load_settings(), request_id, check_sketch=not skip_sketch)
        if as_json:
            typer.echo(json.dumps(asdict(report), default=str, indent=2))
        elif report.status == "match":
            typer.echo(f"match ({'; '.join(report.checked)})")
        elif report.status == "not_found":
            typer.echo(f"not found: {report.message}")
        else:
            diff = report.difference
            assert diff is not None
            typer.echo(f"mismatch at {diff.field}: expected {diff.expected!r}, got {diff.got!r}")
        raise typer.Exit({"match": 0, "mismatch": 1}.get(report.status, 2))
