"""GPU benchmark of the LoRA kernels: check each against the float64 reference, then time it.

    python bench/kernels_gpu.py [--dtype bf16] [--peak-gbps 4800] [--quick]
                                [--out bench/results/kernels_gpu.json]

For every workload (decode batches for BGMV, prefill batches for SGMV, several adapter
popularities and ranks) it times the shrink kernel, the expand kernel and the whole Triton
add_lora, and the grouped PyTorch path, with CUDA events (warmup, then the median of the timed
runs, L2 flushed before each). The floor is the time to move the bytes the op must touch once
(x, y read and written, the A and B rows of every slot in use) at the device's peak memory
bandwidth. Prints a markdown table and writes JSON. Needs a CUDA device; `--dry-run-cpu` runs
two tiny workloads on the CPU through Triton's interpreter to check the script itself (its
timings mean nothing).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

# Runnable as a plain script from a checkout, without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels.batch import LoraBatch  # noqa: E402
from kernels.bgmv_expand import bgmv_expand  # noqa: E402
from kernels.bgmv_shrink import bgmv_shrink  # noqa: E402
from kernels.cases import (  # noqa: E402
    LoraCase,
    make_case,
    reference_problems,
    same_bits,
    sentinel,
)
from kernels.dispatch import add_lora  # noqa: E402
from kernels.reference import reference_shrink  # noqa: E402
from kernels.sgmv_expand import sgmv_expand  # noqa: E402
from kernels.sgmv_shrink import sgmv_shrink  # noqa: E402

# Peak DRAM bandwidth in GB/s by device-name fragment (vendor datasheets); first match wins.
PEAK_GBPS = [
    ("H200", 4800.0),
    ("H100 PCIe", 2000.0),
    ("H100 NVL", 3900.0),
    ("H100", 3350.0),
    ("GH200", 4000.0),
    ("B200", 8000.0),
    ("A100-SXM4-80GB", 2039.0),
    ("A100 80GB PCIe", 1935.0),
    ("A100", 1555.0),
    ("L40S", 864.0),
    ("L40", 864.0),
    ("L4", 300.0),
    ("A10G", 600.0),
    ("A10", 600.0),
    ("RTX 4090", 1008.0),
    ("RTX 3090", 936.0),
    ("V100", 900.0),
    ("T4", 320.0),
]

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Workload:
    phase: str  # "decode" (BGMV) or "prefill" (SGMV)
    popularity: str
    rank_class: int | str
    requests: int
    hidden: int
    out_features: int

    @property
    def prefill(self) -> bool:
        return self.phase == "prefill"


# A 7B-class projection (4096 -> 4096) and a wide MLP one (4096 -> 11008).
FULL = [
    Workload("decode", "identical", 16, 1, 4096, 4096),
    Workload("decode", "distinct", 16, 16, 4096, 4096),
    Workload("decode", "distinct", 16, 64, 4096, 4096),
    Workload("decode", "zipf", 16, 64, 4096, 4096),
    Workload("decode", "identical", 16, 64, 4096, 4096),
    Workload("decode", "distinct", 64, 64, 4096, 4096),
    Workload("decode", "zipf", "mix", 256, 4096, 4096),
    Workload("decode", "with_base", 16, 256, 4096, 11008),
    Workload("prefill", "distinct", 16, 8, 4096, 4096),
    Workload("prefill", "zipf", "mix", 32, 4096, 4096),
    Workload("prefill", "skewed", 64, 32, 4096, 11008),
]
QUICK = [FULL[2], FULL[6], FULL[9]]
DRY_RUN = [
    Workload("decode", "zipf", "mix", 6, 48, 40),
    Workload("prefill", "skewed", 16, 4, 48, 40),
]
PREFILL_TOKENS_PER_REQUEST = 128


def peak_gbps(device: torch.device, override: float | None) -> tuple[float | None, str]:
    if override is not None:
        return override, "--peak-gbps"
    if device.type != "cuda":
        return None, "none (CPU)"
    name = torch.cuda.get_device_name(device)
    for fragment, gbps in PEAK_GBPS:
        if fragment in name:
            return gbps, f"table ({fragment})"
    props = torch.cuda.get_device_properties(device)
    clock_khz = getattr(props, "memory_clock_rate", 0)
    bus_bits = getattr(props, "memory_bus_width", 0)
    if clock_khz and bus_bits:
        # Double data rate: two transfers per memory clock.
        return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9, "device properties"
    return None, "unknown (pass --peak-gbps)"


def build_case(work: Workload, dtype: torch.dtype, device: torch.device, seed: int) -> LoraCase:
    case = make_case(
        work.popularity,
        work.rank_class,
        num_requests=work.requests,
        prefill=False,
        in_features=work.hidden,
        out_features=work.out_features,
        dtype=dtype,
        seed=seed,
    )
    if work.prefill and device.type == "cuda":
        # Serving-sized prompts: every request becomes a run of tokens with its slot.
        case.token_slots = case.token_slots.repeat_interleave(PREFILL_TOKENS_PER_REQUEST)
        gen = torch.Generator().manual_seed(seed + 1)
        shape = (case.token_slots.numel(), work.hidden)
        case.x = torch.randn(shape, generator=gen).to(dtype)
        case.y = torch.randn(shape[0], work.out_features, generator=gen).to(dtype)
    elif work.prefill:
        case.token_slots = case.token_slots.repeat_interleave(3)
        case.x = case.x.repeat_interleave(3, dim=0)
        case.y = case.y.repeat_interleave(3, dim=0)
    return case.to(str(device))


def min_bytes(case: LoraCase, batch: LoraBatch) -> dict[str, int]:
    """Bytes each op must move at least: activations once, each used slot's rank rows once."""
    item = case.x.element_size()
    active = batch.num_active
    used = sorted({slot for slot, _ in batch.slot_rows()})
    ranks = case.ranks.cpu()
    rank_sum = sum(int(ranks[s]) for s in used)
    in_features, out_features = case.x.shape[1], case.y.shape[1]
    shrunk = active * case.lora_a.shape[1] * 4
    shrink = active * in_features * item + rank_sum * in_features * item + shrunk
    expand = shrunk + rank_sum * out_features * item + 2 * active * out_features * item
    total = active * in_features * item + rank_sum * (in_features + out_features) * item
    return {
        "shrink": shrink,
        "expand": expand,
        "add_lora": total + 2 * active * out_features * item,
    }


class Timer:
    """Median time of a callable: CUDA events on the GPU, the host clock otherwise."""

    def __init__(self, device: torch.device, warmup: int, reps: int) -> None:
        self.device = device
        self.warmup = warmup
        self.reps = reps
        # Larger than any GPU's L2, rewritten before each timed run so weights come from DRAM.
        self._flush = (
            torch.empty(512 * 2**20, dtype=torch.uint8, device=device)
            if device.type == "cuda"
            else None
        )

    def median_us(self, fn: Callable[[], object]) -> float:
        for _ in range(self.warmup):
            fn()
        samples = []
        for _ in range(self.reps):
            if self._flush is None:
                start_s = time.perf_counter()
                fn()
                samples.append((time.perf_counter() - start_s) * 1e6)
                continue
            self._flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) * 1e3)
        return statistics.median(samples)


def shrink_ops(case: LoraCase, batch: LoraBatch, out: Tensor) -> Callable[[], None]:
    seg = batch.segments
    if seg is not None:
        return lambda: sgmv_shrink(
            case.x,
            case.lora_a,
            out,
            seg.seg_starts,
            seg.seg_lens,
            seg.seg_slots,
            seg.max_seg_len,
            case.ranks,
            case.scales,
        )
    return lambda: bgmv_shrink(case.x, case.lora_a, out, batch.token_slots, case.ranks, case.scales)


def expand_ops(case: LoraCase, batch: LoraBatch, shrunk: Tensor) -> Callable[[], None]:
    seg = batch.segments
    if seg is not None:
        return lambda: sgmv_expand(
            shrunk,
            case.lora_b,
            case.y,
            seg.seg_starts,
            seg.seg_lens,
            seg.seg_slots,
            seg.max_seg_len,
            case.ranks,
        )
    return lambda: bgmv_expand(shrunk, case.lora_b, case.y, batch.token_slots, case.ranks)


def check_kernels(case: LoraCase, batch: LoraBatch) -> list[str]:
    """Shrink output on the entries it must write (and no others), then the whole add_lora, vs
    the reference."""
    problems = []
    poison = sentinel(torch.float32)
    shrunk = poison.expand(case.x.shape[0], case.lora_a.shape[1]).to(case.x.device).contiguous()
    shrink_ops(case, batch, shrunk)()
    expected = reference_shrink(case.x, case.lora_a, case.ranks, case.scales, case.token_slots)
    slots = case.token_slots.cpu()
    ranks = case.ranks.cpu().long()[slots.clamp(min=0)]
    written = (slots >= 0)[:, None] & (torch.arange(shrunk.shape[1])[None, :] < ranks[:, None])
    untouched = shrunk.cpu()[~written]
    if not same_bits(untouched, poison.expand_as(untouched)):
        problems.append("shrink: wrote outside active rows below their rank")
    got = shrunk.cpu()[written].double()
    want = expected[written]
    # The shrink reads half-precision inputs exactly and sums in float32.
    if not torch.allclose(got, want, atol=1e-3, rtol=1e-3):
        problems.append(f"shrink: max abs error {(got - want).abs().max().item():.3g}")
    reference = case.expected()
    before = case.y.clone()
    add_lora(
        case.y, case.x, case.lora_a, case.lora_b, case.ranks, case.scales, batch, backend="triton"
    )
    problems += [f"add_lora: {p}" for p in reference_problems(case, before, reference)]
    return problems


def bench_workload(
    work: Workload,
    dtype: torch.dtype,
    device: torch.device,
    timer: Timer,
    peak: float | None,
    seed: int,
) -> dict:
    case = build_case(work, dtype, device, seed)
    batch = LoraBatch.from_token_slots(case.token_slots, work.prefill, case.ranks.numel())
    batch.slot_rows()  # the torch path's grouping, built once per forward pass, not per call
    problems = check_kernels(case, batch)

    # Timing needs no NaN: replace the padding so repeated accumulation stays finite.
    case.lora_a = torch.nan_to_num(case.lora_a)
    case.lora_b = torch.nan_to_num(case.lora_b)
    shrunk = torch.zeros(case.x.shape[0], case.lora_a.shape[1], device=device)
    args = (case.x, case.lora_a, case.lora_b, case.ranks, case.scales, batch)
    times = {
        "shrink": timer.median_us(shrink_ops(case, batch, shrunk)),
        "expand": timer.median_us(expand_ops(case, batch, shrunk)),
        "add_lora": timer.median_us(lambda: add_lora(case.y, *args, backend="triton")),
        "torch_path": timer.median_us(lambda: add_lora(case.y, *args, backend="torch")),
    }
    floor_bytes = min_bytes(case, batch)
    floors = {op: nbytes / (peak * 1e9) * 1e6 for op, nbytes in floor_bytes.items()} if peak else {}
    return {
        "kernel": "sgmv" if work.prefill else "bgmv",
        "phase": work.phase,
        "popularity": work.popularity,
        "rank_class": str(work.rank_class),
        "tokens": batch.num_tokens,
        "active_tokens": batch.num_active,
        "slots_in_use": len({slot for slot, _ in batch.slot_rows()}),
        "in_features": work.hidden,
        "out_features": work.out_features,
        "dtype": str(dtype).removeprefix("torch."),
        "us": {op: round(t, 2) for op, t in times.items()},
        "floor_us": {op: round(t, 2) for op, t in floors.items()},
        "floor_bytes": floor_bytes,
        "speedup_vs_torch": round(times["torch_path"] / times["add_lora"], 2),
        "fraction_of_floor": round(floors["add_lora"] / times["add_lora"], 3) if floors else None,
        "matches_reference": not problems,
        "problems": problems,
    }


def markdown(rows: list[dict]) -> str:
    lines = [
        "| kernel | popularity | rank | tokens | slots | in→out | shrink µs | expand µs "
        "| add_lora µs | torch µs | speedup | floor µs | % of floor | ok |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        floor = r["floor_us"].get("add_lora")
        floor_text = "-" if floor is None else f"{floor:.1f}"
        share_text = "-" if floor is None else f"{100 * r['fraction_of_floor']:.0f}%"
        lines.append(
            f"| {r['kernel']} | {r['popularity']} | {r['rank_class']} | {r['tokens']} "
            f"| {r['slots_in_use']} | {r['in_features']}→{r['out_features']} "
            f"| {r['us']['shrink']:.1f} | {r['us']['expand']:.1f} | {r['us']['add_lora']:.1f} "
            f"| {r['us']['torch_path']:.1f} | {r['speedup_vs_torch']:.1f}x "
            f"| {floor_text} | {share_text} "
            f"| {'yes' if r['matches_reference'] else 'NO'} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument(
        "--peak-gbps",
        type=float,
        default=None,
        help="peak DRAM bandwidth in GB/s (default: from the device)",
    )
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--reps", type=int, default=25)
    parser.add_argument("--quick", action="store_true", help="three workloads only")
    parser.add_argument(
        "--dry-run-cpu",
        action="store_true",
        help="tiny workloads on the CPU via Triton's interpreter (checks the script)",
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results/kernels_gpu.json"))
    args = parser.parse_args()

    if args.dry_run_cpu:
        device, workloads = torch.device("cpu"), DRY_RUN
        args.warmup, args.reps = 1, 2
    elif not torch.cuda.is_available():
        print(
            "bench/kernels_gpu.py needs a CUDA device and none is visible "
            "(torch.cuda.is_available() is False); run it on a GPU machine, or pass "
            "--dry-run-cpu to check the script on the CPU",
            file=sys.stderr,
        )
        return 2
    else:
        device, workloads = torch.device("cuda"), QUICK if args.quick else FULL

    dtype = DTYPES[args.dtype]
    peak, peak_source = peak_gbps(device, args.peak_gbps)
    timer = Timer(device, args.warmup, args.reps)
    rows = []
    for seed, work in enumerate(workloads):
        rows.append(bench_workload(work, dtype, device, timer, peak, seed))
        print(f"done {work.phase} {work.popularity} rank {work.rank_class}", file=sys.stderr)

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"\n{device_name}, {args.dtype}, peak {peak or '?'} GB/s ({peak_source})\n")
    print(markdown(rows))
    report = {
        "device": device_name,
        "dry_run_cpu": args.dry_run_cpu,
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "dtype": args.dtype,
        "peak_gbps": peak,
        "peak_source": peak_source,
        "warmup": args.warmup,
        "reps": args.reps,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    failed = [r for r in rows if not r["matches_reference"]]
    for r in failed:
        print(
            f"MISMATCH {r['kernel']} {r['popularity']}: {'; '.join(r['problems'])}", file=sys.stderr
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
