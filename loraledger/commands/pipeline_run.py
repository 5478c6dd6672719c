"""`loraledger pipeline`: one Faust worker running the stream processors (all of them unless
`--processor` names some)."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Collection
from pathlib import Path

import typer

from infra.kafka.clients import cluster_replication
from infra.settings import Settings, load_settings
from pipeline.agents import Processor, build_pipeline, pipeline_principal

# Faust's own names for the levels.
_FAUST_LEVELS = {"debug": "debug", "info": "info", "warning": "warn", "error": "error",
                 "critical": "crit"}


def run_pipeline(
    settings: Settings,
    log_level: str = "warning",
    processors: Collection[Processor] = tuple(Processor),
) -> None:
    """Run a Faust worker with `processors` until it is stopped. It serves no web endpoint:
    several stacks share a machine, and nothing reads it."""
    # Asked as the app's own principal: its process may hold no other credentials.
    replicas = _replicas(settings.acting_as(pipeline_principal(processors)))
    app = build_pipeline(settings, processors, replicas)
    # Faust creates its data directory but not the parents.
    Path(app.conf.datadir).parent.mkdir(parents=True, exist_ok=True)
    sys.argv = [sys.argv[0], "worker", "-l", _FAUST_LEVELS[log_level], "--without-web"]
    app.main()


def _replicas(settings: Settings) -> int:
    """How many copies of its changelogs the cluster can keep; asked on a loop of its own, as
    Faust runs on the current one."""
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(cluster_replication(settings)).replicas
    except Exception as exc:
        raise SystemExit(
            f"error: no Kafka broker answers at {settings.kafka_bootstrap} "
            f"({type(exc).__name__}): start it with `loraledger stack up`"
        ) from None
    finally:
        loop.close()


def register(app: typer.Typer) -> None:
    @app.command("pipeline")
    def pipeline(
        log_level: str = typer.Option(
            "warning", "--log-level", "-l", help="debug, info, warning or error"
        ),
        processors: list[Processor] = typer.Option(
            list(Processor),
            "--processor",
            "-p",
            help="run only this processor (repeatable; default: all)",
        ),
    ) -> None:
        """Run the stream processors (attribution and the others) in one Faust worker."""
        if log_level not in _FAUST_LEVELS:
            raise typer.BadParameter("use debug, info, warning, error or critical")
        run_pipeline(load_settings(), log_level, processors)
