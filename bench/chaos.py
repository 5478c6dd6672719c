"""The chaos scenario as a benchmark: a three-node cluster of its
own on free loopback ports, two workers, two pipeline instances and a steady stream of requests;
a broker, a worker and a pipeline instance are SIGKILLed and restarted, and a worker is
SIGSTOPped past its session timeout (tests/support/chaos_run.py). Reported per phase, from the
same run: payments readable per second and the latency from sending a request to its payment
being readable (p50, p99), each against the steady phase before the faults (the baseline).

    python bench/chaos.py --requests 2000 --rate 16

Needs no running stack (it starts and stops its own). Writes bench/results/chaos.json and
prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "support"))

from chaos_run import ChaosConfig, PhaseFigures, chaos_run  # noqa: E402


def table(figures: list[PhaseFigures]) -> str:
    steady = figures[0]
    lines = [
        "| phase | s | sent | paid/s | x steady | p50 ms | p99 ms | p99 x steady |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for phase in figures:
        lines.append(
            f"| {phase.name} | {phase.seconds:.1f} | {phase.sent} | {phase.paid_per_s:.1f} | "
            f"{phase.paid_per_s / steady.paid_per_s:.2f} | {phase.p50_ms:.0f} | "
            f"{phase.p99_ms:.0f} | {phase.p99_ms / steady.p99_ms:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    defaults = ChaosConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=defaults.requests,
                        help="at least this many; the stream runs on until the faults are over")
    parser.add_argument("--rate", type=float, default=defaults.rate, help="offered requests/s")
    parser.add_argument("--adapters", type=int, default=defaults.adapters)
    parser.add_argument("--steady-requests", type=int, default=defaults.steady_requests,
                        help="requests sent during the steady (baseline) phase")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/chaos.json")
    args = parser.parse_args()
    config = ChaosConfig(requests=args.requests, rate=args.rate, adapters=args.adapters,
                         steady_requests=args.steady_requests)
    with tempfile.TemporaryDirectory(prefix="loraledger-chaos-") as tmp, \
            chaos_run(Path(tmp), config) as run:
        figures = run.figures()
    steady = figures[0]
    report = {
        "benchmark": "chaos",
        "baseline": "the steady phase of the same run, before any fault",
        "config": asdict(config),
        "machine": {"platform": platform.platform()},
        "requests": len(run.sent),
        "seconds": run.seconds,
        "groups_drained": run.drained,
        "partitions_behind": run.undrained,
        "woken_worker_fenced_commits": len(run.fenced),
        "pipeline_restarts_after_a_fence": run.restarts,
        "phases": [
            {**asdict(phase), "paid_per_s_vs_steady": phase.paid_per_s / steady.paid_per_s,
             "p99_vs_steady": phase.p99_ms / steady.p99_ms}
            for phase in figures
        ],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(table(figures))
    print(f"\n{len(run.sent)} requests in {run.seconds:.0f} s; every consumer group committed "
          f"past everything: {'yes' if run.drained else 'NO'}; wrote {args.out}")
    for behind in run.undrained:
        print(f"  behind: {behind}")


if __name__ == "__main__":
    main()
