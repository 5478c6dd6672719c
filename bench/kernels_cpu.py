"""CPU micro-benchmark of the LoRA delta: the grouped fast path against a per-token loop and the
float64 reference, on decode and prefill batches of several adapter-popularity patterns.

    python bench/kernels_cpu.py [--threads 1] [--reps 15] [--out bench/results/kernels_cpu.json]

Prints a markdown table (median microseconds per add_lora call, and how many times slower the
per-token loop and the reference are) and writes the same rows as JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

# Runnable as a plain script from a checkout, without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels.batch import LoraBatch  # noqa: E402
from kernels.cases import LoraCase, make_case, reference_problems  # noqa: E402
from kernels.dispatch import add_lora  # noqa: E402
from kernels.reference import reference_add_lora  # noqa: E402

# (label, popularity, rank class, requests, prefill, hidden size): sizes of a small base model.
CONFIGS = [
    ("decode", "distinct", 16, 32, False, 896),
    ("decode", "zipf", 16, 32, False, 896),
    ("decode", "identical", 16, 32, False, 896),
    ("decode", "with_base", "mix", 32, False, 896),
    ("decode", "zipf", 64, 8, False, 2048),
    ("prefill", "zipf", 16, 8, True, 896),
    ("prefill", "skewed", "mix", 8, True, 896),
]


def per_token_loop(case: LoraCase) -> None:
    """The obvious implementation: one pair of GEMVs per token."""
    ranks, scales = case.ranks.tolist(), case.scales.tolist()
    for i, slot in enumerate(case.token_slots.tolist()):
        if slot < 0:
            continue
        r = ranks[slot]
        shrunk = F.linear(case.x[i], case.lora_a[slot, :r]) * scales[slot]
        case.y[i] += F.linear(shrunk, case.lora_b[slot, :, :r])


def median_us(fn: Callable[[], object], reps: int) -> float:
    fn()
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e6


def bench_config(
    label: str, popularity: str, rank_class, requests: int, prefill: bool, hidden: int, reps: int
) -> dict:
    case = make_case(
        popularity,
        rank_class,
        num_requests=requests,
        prefill=prefill,
        in_features=hidden,
        out_features=hidden,
        seed=0,
    )
    expected = case.expected()
    before = case.y.clone()
    batch = LoraBatch.from_token_slots(case.token_slots, prefill, case.ranks.numel())
    add_lora(
        case.y, case.x, case.lora_a, case.lora_b, case.ranks, case.scales, batch, backend="torch"
    )
    problems = reference_problems(case, before, expected)

    def fast() -> None:
        add_lora(
            case.y,
            case.x,
            case.lora_a,
            case.lora_b,
            case.ranks,
            case.scales,
            batch,
            backend="torch",
        )

    def reference() -> Tensor:
        return reference_add_lora(
            case.y, case.x, case.lora_a, case.lora_b, case.ranks, case.scales, case.token_slots
        )

    # NaN padding only matters for the correctness check above; the loops below read none.
    fast_us = median_us(fast, reps)
    loop_us = median_us(lambda: per_token_loop(case), reps)
    reference_us = median_us(reference, max(3, reps // 5))
    return {
        "phase": label,
        "popularity": popularity,
        "rank_class": str(rank_class),
        "tokens": case.token_slots.numel(),
        "active_tokens": batch.num_active,
        "slots": case.ranks.numel(),
        "hidden": hidden,
        "fast_us": round(fast_us, 1),
        "per_token_loop_us": round(loop_us, 1),
        "reference_us": round(reference_us, 1),
        "loop_over_fast": round(loop_us / fast_us, 2),
        "reference_over_fast": round(reference_us / fast_us, 2),
        "matches_reference": not problems,
        "problems": problems,
    }


def markdown(rows: list[dict]) -> str:
    lines = [
        "| phase | popularity | rank | tokens | slots | hidden | fast µs | loop µs | ref µs "
        "| loop/fast | ref/fast | ok |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['phase']} | {r['popularity']} | {r['rank_class']} | {r['tokens']} "
            f"| {r['slots']} | {r['hidden']} | {r['fast_us']:.0f} | {r['per_token_loop_us']:.0f} "
            f"| {r['reference_us']:.0f} | {r['loop_over_fast']:.1f}x "
            f"| {r['reference_over_fast']:.1f}x | {'yes' if r['matches_reference'] else 'NO'} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--reps", type=int, default=15, help="timed repetitions per method")
    parser.add_argument("--out", type=Path, default=Path("bench/results/kernels_cpu.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rows = [bench_config(*config, reps=args.reps) for config in CONFIGS]
    table = markdown(rows)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "torch": torch.__version__,
        "machine": platform.machine(),
        "processor": platform.processor(),
        "threads": args.threads,
        "dtype": "float32",
        "rows": rows,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0 if all(r["matches_reference"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
