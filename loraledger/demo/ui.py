"""The demo's terminal output: a rule and a timed check line per step, progress bars, and the
closing summary read from the ledger."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

if TYPE_CHECKING:  # the summary imports the steps; the steps import this module's bars
    from loraledger.demo.summary import DemoSummary

PPM = 1_000_000
TOP_CONTRIBUTORS = 10


def progress_bar(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )


class StepLog:
    """Prints each step's heading and outcome, and keeps (step, outcome, seconds) in `done`."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.done: list[tuple[str, str, float]] = []

    @contextmanager
    def step(self, name: str) -> Iterator[list[str]]:
        """Times a step; the body appends its outcome ("cached", "built", ...)."""
        outcome: list[str] = []
        started = time.monotonic()
        self.console.rule(f"[bold]{name}")
        yield outcome
        seconds = time.monotonic() - started
        text = ", ".join(outcome) or "done"
        self.done.append((name, text, seconds))
        self.console.print(f"[green]✓[/green] {name}: {text} ({seconds:.1f}s)")


def _units(micro: int) -> str:
    """Ledger amounts are integer micro-units; shown as they are stored."""
    return f"{int(micro):,} µ"


def print_summary(summary: DemoSummary, console: Console) -> None:
    """Usage and rewards from the ledger, then one request from prompt to payout."""
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
