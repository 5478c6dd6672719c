"""The `loraledger` command line: one typer app assembled from the command modules."""

from __future__ import annotations

import importlib
from typing import Any, NoReturn

import typer

from infra.clickhouse_client import ClickHouseConfigError
from infra.kafka.security import AUTHORIZATION_ERRORS, CredentialsError

# Each module under loraledger/commands exposes `register(app)`.
COMMAND_MODULES: tuple[str, ...] = (
    "stack",
    "ledger",
    "events",
    "generate",
    "governance",
    "query",
    "replay",
    "worker",
    "serve",
    "workers",
    "pipeline_run",
    "verify",
    "datanet",
    "models",
    "demo",
)


class _Cli(typer.Typer):
    """Ends an unusable ledger setting (no ledger server, a directory another process holds),
    missing Kafka credentials and a refusal by the broker's ACLs in a one-line message rather
    than a traceback, whichever command met it."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().__call__(*args, **kwargs)
        except (ClickHouseConfigError, CredentialsError) as exc:
            _fail(str(exc))
        except AUTHORIZATION_ERRORS as exc:
            _fail(
                "the broker's ACLs do not allow this command's Kafka principal to do that "
                f"({exc})"
            )


def _fail(message: str) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise SystemExit(1) from None


app = _Cli(
    name="loraledger",
    help="Serve many LoRA adapters on one base model and pay the contributors behind each answer.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

for _name in COMMAND_MODULES:
    importlib.import_module(f"loraledger.commands.{_name}").register(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
