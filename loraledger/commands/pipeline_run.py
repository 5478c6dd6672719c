"""`loraledger pipeline`: one Faust worker running every stream processor."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import typer

# Faust's own names for the levels.
_FAUST_LEVELS = {"debug": "debug", "info": "info", "warning": "warn", "error": "error",
                 "critical": "crit"}


def run_pipeline(log_level: str = "warning", agents_module: str = "pipeline.agents") -> None:
    """Run the Faust worker with the agents `agents_module` registers (default: all of them)
    until it is stopped. It serves no web endpoint: several stacks share a machine, and nothing
    reads it."""
    importlib.import_module(agents_module)
    from pipeline.app import app

    # Faust creates its data directory but not the parents.
    Path(app.conf.datadir).parent.mkdir(parents=True, exist_ok=True)
    sys.argv = [sys.argv[0], "worker", "-l", _FAUST_LEVELS[log_level], "--without-web"]
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
        run_pipeline(log_level)
