"""What a finished demo run hands back to be shown."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from loraledger.demo.steps.ledger_check import LedgerCheck
from loraledger.demo.steps.trace import Trace


@dataclass
class DemoSummary:
    broker_note: str
    steps: list[tuple[str, str, float]]  # (step, outcome, seconds)
    requests: int
    errors: int
    ledger: LedgerCheck
    usage: Any  # pipeline.queries.QueryResult
    rewards: Any  # pipeline.queries.QueryResult
    trace: Trace
    verify: Any  # pipeline.verify.VerifyReport
    seconds: float
