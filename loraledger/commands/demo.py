"""`loraledger demo`: the whole path on the local stack, from datanets to a verified payout."""

from __future__ import annotations

import typer
from rich.console import Console

console = Console()
err_console = Console(stderr=True)


def demo(
    requests: int = typer.Option(300, "--requests", min=1, help="Inference requests to send."),
    adapters: int = typer.Option(3, "--adapters", min=1, max=4,
                                 help="Adapters, one per demo datanet."),
    keep_running: bool = typer.Option(
        False, "--keep-running", help="Leave the broker running if the demo started it."
    ),
    fresh: bool = typer.Option(
        False, "--fresh", help="Regenerate the demo's datanets and retrain its adapters."
    ),
    timeout: float = typer.Option(
        600.0, "--timeout", min=1.0, help="Seconds to wait for every attribution and reward."
    ),
    base_preset: str = typer.Option(
        "default", "--base-preset", help="Base model preset: default, or test (seconds to build)."
    ),
    train_steps: int | None = typer.Option(
        None, "--train-steps", min=1, help="Training steps per adapter [the factory's default]."
    ),
) -> None:
    """Datanets, adapters, the worker and the pipeline on the local stack: send requests, wait
    until each is attributed and paid, then show the ledger and verify one request."""
    from infra.settings import load_settings
    from loraledger.demo.errors import DemoError
    from loraledger.demo.options import DemoOptions
    from loraledger.demo.run import run_demo
    from loraledger.demo.ui import print_summary

    try:
        from transformers.utils import logging as hf_logging

        from inference.base_model import preset
        from inference.factory import TrainConfig

        hf_logging.disable_progress_bar()  # the demo draws its own bars

        preset(base_preset)
        train = TrainConfig() if train_steps is None else TrainConfig(steps=train_steps)
        options = DemoOptions(requests=requests, adapters=adapters, keep_running=keep_running,
                              fresh=fresh, wait_timeout_s=timeout, base_preset=base_preset,
                              train=train)
        summary = run_demo(load_settings(), options, console)
    except (DemoError, ValueError, KeyError, FileNotFoundError, RuntimeError) as exc:
        message = str(exc).strip("'\"") or type(exc).__name__
        err_console.print(f"[red]demo failed:[/red] {message}")
        raise typer.Exit(1) from None
    print_summary(summary, console)


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
