"""`loraledger demo`: the whole path on the local stack, from datanets to a verified payout."""

from __future__ import annotations

from collections import defaultdict

import typer
from rich.console import Console
from rich.table import Table

console = Console()
err_console = Console(stderr=True)

PPM = 1_000_000
TOP_CONTRIBUTORS = 10


def _units(micro: int) -> str:
    """Ledger amounts are integer micro-units; shown as they are stored."""
    return f"{int(micro):,} µ"


def print_summary(summary: object, console: Console = console) -> None:
    """Usage and rewards from the ledger, then one request from prompt to payout."""
    from loraledger.demo_run import DemoSummary

    assert isinstance(summary, DemoSummary)
    usage = Table("adapter", "requests", "errors", "prompt tokens", "completion tokens", "fees",
                  title="Usage per adapter (ClickHouse ledger, all runs)")
    totals: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0, 0])
    for row in summary.usage.records():
        line = totals[row["adapter_id"]]
        for i, column in enumerate(("requests", "errors", "prompt_tokens", "completion_tokens",
                                    "fees")):
            line[i] += int(row[column])
    for adapter, (requests, errors, prompt, completion, fees) in sorted(totals.items()):
        usage.add_row(adapter, str(requests), str(errors), str(prompt), str(completion),
                      _units(fees))
    console.print(usage)

    earned: dict[str, int] = defaultdict(int)
    entries: dict[str, int] = defaultdict(int)
    for row in summary.rewards.records():
        if row["role"] == "contributor":
            earned[row["beneficiary_id"]] += int(row["amount"])
            entries[row["beneficiary_id"]] += int(row["entries"])
    top = Table("contributor", "rewards", "paid requests",
                title=f"Top {TOP_CONTRIBUTORS} contributors (ClickHouse ledger, all runs)")
    for contributor, amount in sorted(earned.items(), key=lambda kv: (-kv[1], kv[0]))[
        :TOP_CONTRIBUTORS
    ]:
        top.add_row(contributor, _units(amount), str(entries[contributor]))
    console.print(top)

    trace = summary.trace
    console.rule(f"[bold]request {trace.request.request_id}, from prompt to payout")
    console.print(f"adapter  {trace.request.adapter_id}")
    console.print(f"prompt   {trace.request.prompt!r}")
    if trace.planted_by:
        console.print(f"         (a fact planted by {trace.planted_by})")
    console.print(f"output   {trace.result.output_text!r}")
    usage_line = trace.result.usage
    console.print(f"tokens   {usage_line.prompt_tokens} prompt + {usage_line.completion_tokens} "
                  f"completion, worker {trace.result.worker_id}")
    method = trace.attribution.method
    console.print(f"method   {method.name} {method.version} {method.params}")
    examples = Table("score", "contributor", "datanet", "training example",
                     title="Top training examples")
    for example in trace.attribution.top_examples[:8]:
        examples.add_row(f"{example.score:.4g}", example.contributor_id, example.datanet_id,
                         trace.row_texts.get(example.row_id, "?"))
    console.print(examples)
    weights = Table("contributor", "datanet", "weight", title="Contributor weights")
    for weight in sorted(trace.attribution.contributor_weights, key=lambda w: -w.ppm):
        weights.add_row(weight.contributor_id, weight.datanet_id,
                        f"{weight.ppm} ppm ({weight.ppm / PPM:.1%})")
    console.print(weights)
    payout = Table("beneficiary", "role", "amount", "reason",
                   title="Reward entries (ClickHouse ledger)")
    fee = 0
    for beneficiary, role, amount, fee_total, reason in trace.entries:
        payout.add_row(beneficiary, role, _units(amount), reason)
        fee = fee_total
    paid = sum(int(entry[2]) for entry in trace.entries)
    console.print(payout)
    console.print(f"fee {_units(fee)}, paid out {_units(paid)}")
    checked = ", ".join(summary.verify.checked)
    console.print(f"verify: [bold green]{summary.verify.status}[/bold green] ({checked})")
    console.rule()
    console.print(f"broker: {summary.broker_note}")
    cached = [name for name, outcome, _ in summary.steps if "cached" in outcome]
    console.print(f"demo finished in {summary.seconds:.0f}s"
                  + (f" (cached: {', '.join(cached)})" if cached else ""))


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
    from loraledger.demo_run import DemoError, DemoOptions, run_demo

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
    print_summary(summary)


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
