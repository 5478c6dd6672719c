"""What the benchmarks share: rounds that rotate their configurations, the machine facts every
JSON report carries, and how a report is written."""

from __future__ import annotations

import json
import os
import platform
import sys
from collections.abc import Callable
from pathlib import Path

import torch


def measure_round(
    runners: dict[str, Callable[[], float]], round_index: int
) -> dict[str, float]:
    """Every runner's result once, starting from a different one each round, so that a slow
    spell of a shared machine does not always fall on the same configuration."""
    keys = list(runners)
    shift = round_index % len(keys)
    results = {key: runners[key]() for key in keys[shift:] + keys[:shift]}
    return {key: results[key] for key in keys}


def machine_facts() -> dict:
    """Python and torch versions, the CPU, and the load average while it ran (a benchmark on a
    shared machine reads its numbers against it)."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "load_average": os.getloadavg(),
    }


def write_report(out: Path, report: dict) -> None:
    """Write the report as JSON (values JSON lacks, such as paths, as text) and say where."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str))
    print(f"\nwrote {out}", file=sys.stderr)
