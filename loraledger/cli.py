"""The `loraledger` command line: one typer app assembled from the command modules."""

from __future__ import annotations

import importlib
import sys
from typing import NoReturn

import typer

from infra.kafka.security import AUTHORIZATION_ERRORS, CredentialsError

# Each module under loraledger/commands exposes `register(app)`.
COMMAND_MODULES: tuple[str, ...] = (
    "stack",
    "events",
    "generate",
    "governance",
    "query",
    "replay",
    "worker",
    "pipeline_run",
    "verify",
    "datanet",
    "models",
    "demo",
)

app = typer.Typer(
    name="loraledger",
    help="Serve many LoRA adapters on one base model and pay the contributors behind each answer.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

for _name in COMMAND_MODULES:
    importlib.import_module(f"loraledger.commands.{_name}").register(app)


def main() -> None:
    try:
        app()
    except CredentialsError as exc:
        _fail(str(exc))
    except AUTHORIZATION_ERRORS as exc:
        _fail(f"the broker's ACLs do not allow this command's Kafka principal to do that ({exc})")


def _fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
    main()
