"""`loraledger pipeline`: one Faust worker running every stream processor."""

from __future__ import annotations

import importlib
import sys

import typer

# Faust's own names for the levels.
_FAUST_LEVELS = {"debug": "debug", "info": "info", "warning": "warn", "error": "error",
                 "critical": "crit"}


def run_worker(log_level: str = "warning", agents_module: str = "pipeline.agents") -> None:
    """Run the Faust worker with the agents `agents_module` registers (default: all of them)
    until it is stopped. Its data directory lives under the settings' home, and it serves no
    web endpoint (several stacks share a machine, and nothing reads it)."""
    importlib.import_module(agents_module)
    from pipeline.app import app, settings

    datadir = settings.home / "faust"
    level = _FAUST_LEVELS[log_level]
    sys.argv = [sys.argv[0], "--datadir", str(datadir), "worker", "-l", level, "--without-web"]
    app.main()


def register(app: typer.Typer) -> None:
    @app.command("pipeline")
    def pipeline(
        log_level: str = typer.Option(
            "warning", "--log-level", "-l", help="debug, info, warning or error"
        ),
    ) -> None:
        """Run the stream processors (attribution and the others) in one Faust worker."""
        if log_level not in _FAUST_LEVELS:
            raise typer.BadParameter("use debug, info, warning, error or critical")
        run_worker(log_level)
