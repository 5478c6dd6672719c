"""How fast the CPU computes a decode step's matrix products, by weight layout: the products
take over 80% of a real checkpoint's decode step (`bench/real_model.py`), and at a decode
batch they are bound by how fast the weights are read. One pass multiplies a batch of rows by
every weight of one forward pass, shaped as the engine fuses them (q|k|v, o, gate|up, down per
layer, then the LM head), with random weights of SmolLM2-135M's shapes by default:
  transformers  F.linear over row-major [out, in] weights, as nn.Linear holds them (the peer,
                and the baseline of every ratio);
  this engine   F.linear over the engine's layout: column-major weights
                (`inference.lora_layers.column_major`) but for down_proj;
  mkl-packed    MKL's packed GEMM (`torch.ops.mkl._mkl_linear`, float32 only), weights packed
                once for the batch size;
  onednn-packed oneDNN's linear over weights reordered once for the batch size
                (`torch.ops.mkldnn._linear_pointwise`);
  read ceiling  a sum over the same weights: reading the bytes with no product at all.
Every path's product is checked against a float64 reference first. The paths run in rounds that
rotate their order; a ratio is the median of its per-round ratios against the baseline. Prints
a markdown table and writes JSON.

    python bench/cpu_products.py                      # 1 thread, batch 8, float32
    python bench/cpu_products.py --dtype bfloat16
    python bench/cpu_products.py --layers 2 --vocab 4096 --repeats 2    # quick
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "support"))

from bench_report import machine_facts, measure_round, write_report  # noqa: E402

from inference.lora_layers import column_major  # noqa: E402

DEFAULT_OUT = ROOT / "bench" / "results" / "cpu_products.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}  # of the reference's largest value
BASELINE = "transformers"
CLOCKS: dict[str, Callable[[], float]] = {"cpu": time.thread_time, "wall": time.perf_counter}

Product = Callable[[Tensor], Tensor]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=8, help="rows multiplied together")
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--intermediate", type=int, default=1536)
    parser.add_argument("--kv-dim", type=int, default=192, help="key (and value) width")
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--vocab", type=int, default=49152, help="LM head rows")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved rounds")
    parser.add_argument(
        "--clock", choices=sorted(CLOCKS), default="cpu",
        help="cpu: seconds this thread ran (with one thread, what an unshared core would take); "
        "wall: elapsed seconds",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    small = [name for name in ("threads", "batch", "hidden", "intermediate", "kv_dim", "layers",
                               "vocab", "repeats") if getattr(args, name) < 1]
    if small:
        parser.error(f"--{small[0].replace('_', '-')} must be at least 1")
    return args


def weight_shapes(args: argparse.Namespace) -> list[tuple[int, int, bool]]:
    """[out, in] of every product of one forward pass, fused as the engine fuses them, and
    whether the engine keeps that weight column-major (down_proj stays row-major, see
    `inference/model.py`)."""
    layer = [
        (args.hidden + 2 * args.kv_dim, args.hidden, True),  # q|k|v
        (args.hidden, args.hidden, True),  # o
        (2 * args.intermediate, args.hidden, True),  # gate|up
        (args.hidden, args.intermediate, False),  # down
    ]
    return layer * args.layers + [(args.vocab, args.hidden, True)]


def product_paths(
    weights: list[Tensor], engine_column_major: list[bool], batch: int
) -> dict[str, list[Product]]:
    """Each path's product by every weight, in its own layout of that weight."""
    row_major = weights
    # As the engine holds them: built column-major, then cast (a cast keeps the layout).
    engine = [column_major(*w.shape).to(w.dtype).copy_(w) if column else w
              for w, column in zip(weights, engine_column_major, strict=True)]
    paths: dict[str, list[Product]] = {
        "transformers": [lambda x, w=w: F.linear(x, w) for w in row_major],
        "this engine": [lambda x, w=w: F.linear(x, w) for w in engine],
    }
    dtype = weights[0].dtype
    if dtype == torch.float32 and torch.backends.mkl.is_available():
        packed = [(torch.ops.mkl._mkl_reorder_linear_weight(w, batch), w) for w in row_major]
        paths["mkl-packed"] = [
            lambda x, p=p, w=w: torch.ops.mkl._mkl_linear(x, p, w, None, batch)
            for p, w in packed
        ]
    if torch.backends.mkldnn.is_available():
        reordered = [torch.ops.mkldnn._reorder_linear_weight(w, batch) for w in row_major]
        paths["onednn-packed"] = [
            lambda x, p=p: torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "")
            for p in reordered
        ]
    return paths


def check_against_reference(
    paths: dict[str, list[Product]],
    weights: list[Tensor],
    inputs: dict[int, Tensor],
) -> dict[str, float]:
    """Each path's largest error over every product, relative to the float64 reference's
    largest value; a path outside the dtype's tolerance stops the benchmark."""
    tolerance = TOLERANCE[weights[0].dtype]
    errors = {}
    for name, products in paths.items():
        worst = 0.0
        for product, weight in zip(products, weights, strict=True):
            x = inputs[weight.shape[1]]
            reference = x.double() @ weight.double().T
            got = product(x).double()
            worst = max(worst, float((got - reference).abs().max() / reference.abs().max()))
        if worst > tolerance:
            raise SystemExit(f"{name}: products differ from float64 by {worst:.2e} "
                             f"(tolerance {tolerance:.0e})")
        errors[name] = worst
    return errors


def timed_pass(
    products: list[Product], weights: list[Tensor], inputs: dict[int, Tensor],
    clock: Callable[[], float],
) -> float:
    started = clock()
    for product, weight in zip(products, weights, strict=True):
        product(inputs[weight.shape[1]])
    return clock() - started


def read_pass(weights: list[Tensor], clock: Callable[[], float]) -> float:
    started = clock()
    for weight in weights:
        weight.sum()
    return clock() - started


def markdown(rows: list[dict], batch: int, dtype: str, clock: str, repeats: int) -> str:
    lines = [
        f"| path, batch {batch}, {dtype} | ms per pass ({clock} clock, median of {repeats}) "
        f"| weights read GB/s | x {BASELINE} (median of rounds) | error vs float64 |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        error = "-" if row["error"] is None else f"{row['error']:.1e}"
        lines.append(f"| {row['path']} | {row['seconds'] * 1e3:,.2f} | {row['gb_per_s']:.2f} "
                     f"| {row['ratio']:.2f} | {error} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype = DTYPES[args.dtype]
    clock = CLOCKS[args.clock]
    shapes = weight_shapes(args)
    weights = [torch.randn(out, width, dtype=dtype) / width**0.5 for out, width, _ in shapes]
    inputs = {width: torch.randn(args.batch, width, dtype=dtype) for _, width, _ in shapes}
    weight_bytes = sum(w.numel() * w.element_size() for w in weights)
    paths = product_paths(weights, [column for *_, column in shapes], args.batch)
    errors = check_against_reference(paths, weights, inputs)
    runners: dict[str, Callable[[], float]] = {
        name: (lambda products=products: timed_pass(products, weights, inputs, clock))
        for name, products in paths.items()
    }
    runners["read ceiling"] = lambda: read_pass(weights, clock)
    for runner in runners.values():  # warm-up: packed buffers and caches touched once
        runner()
    rounds: list[dict[str, float]] = []
    for number in range(args.repeats):
        rounds.append(measure_round(runners, number))
        print(f"round {number + 1}/{args.repeats}: " + "  ".join(
            f"{name} {seconds * 1e3:.1f} ms" for name, seconds in rounds[-1].items()),
            file=sys.stderr)
    rows = []
    for name in runners:
        seconds = statistics.median(r[name] for r in rounds)
        # A ratio above 1: the path takes less time than the baseline.
        per_round = [r[BASELINE] / r[name] for r in rounds]
        rows.append({
            "path": name,
            "seconds": seconds,
            "gb_per_s": weight_bytes / seconds / 1e9,
            "ratio": statistics.median(per_round),
            "ratios_per_round": per_round,
            "error": errors.get(name),
        })
    print(markdown(rows, args.batch, args.dtype, args.clock, args.repeats))
    result = {
        "benchmark": "cpu_products",
        "peer": "transformers (nn.Linear's row-major weights through F.linear)",
        "args": {k: v.name if isinstance(v, Path) else v for k, v in vars(args).items()},
        "weight_bytes": weight_bytes,
        "products_per_pass": len(shapes),
        "machine": machine_facts(),
        "rows": rows,
    }
    write_report(args.out, result)
    return result


if __name__ == "__main__":
    main()
