"""Decode throughput on a real checkpoint on the CPU: SmolLM2-135M-Instruct, imported from its
GGUF file (fetched once into the cache, see tests/support/smollm2.py), with random PEFT adapters
on every projection:
  (a) this engine, the base model only,
  (b) this engine, a mixed batch where every request has its own adapter,
  (c) transformers + peft, the same mixed batch (`adapter_names=[...]`),
  (d) transformers, the base model only.
Every configuration decodes the same batch of prompts (real text, cut to one length so peft needs
no padding) greedily for a fixed number of steps; tokens/s counts decode steps only, by the
decoding thread's CPU time unless `--clock wall` (one thread: the CPU time is what an unshared
core would take, which other work on a shared machine barely changes). All four
live in one process, run after a warm-up, in rounds that rotate their order; a ratio is the
median of its per-round ratios (the spread is shown), so a shared machine's slow spells cancel
instead of landing on one configuration. `--dtype bfloat16` serves base and adapter weights in
bfloat16 in all four (transformers and peft too), so the peers compare in one precision. The
issue's targets: (b)/(a) >= 0.85, (b)/(c) >= 3, (a)/(d) >= 1.5. Prints a markdown table and
writes JSON.

    python bench/real_model.py                       # 1 thread, batch 8, 8 adapters of rank 16
    python bench/real_model.py --dtype bfloat16      # the same in bfloat16
    python bench/real_model.py --steps 4 --batch 2 --adapters 2 --repeats 2   # quick
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "support"))
sys.path.insert(0, str(ROOT / "bench"))

from bench_report import machine_facts, measure_round, write_report  # noqa: E402
from multi_lora import load_peft, peft_decode  # noqa: E402
from random_adapters import write_random_adapter  # noqa: E402
from smollm2 import smollm2_checkpoint  # noqa: E402

from inference.config import LORA_TARGETS, ModelConfig  # noqa: E402
from inference.engine import Engine, EngineConfig, GenerationRequest  # noqa: E402
from inference.tokenizer import encode_prompts, load_tokenizer  # noqa: E402
from infra.settings import load_settings  # noqa: E402

DEFAULT_OUT = ROOT / "bench" / "results" / "real_model.json"
TEXTS = (
    "The history of the printing press begins in the fifteenth century, when",
    "To make a simple bread dough, mix flour, water, salt and yeast, then",
    "The mitochondria are the organelles that produce most of the energy in",
    "In the early days of aviation, pilots navigated by following railways and",
    "A good unit test checks one behaviour, runs quickly, and fails with a message",
    "The river flooded the lower town every spring until the engineers built",
    "When the market opened on Monday, the price of copper rose sharply because",
    "The old lighthouse keeper climbed the spiral stairs each evening to light",
)
TARGETS = {"(b)/(a)": 0.85, "(b)/(c)": 3.0, "(a)/(d)": 1.5}
# Every configuration computes on the calling thread when torch has one thread.
CLOCKS: dict[str, Callable[[], float]] = {"cpu": time.thread_time, "wall": time.perf_counter}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
RATIOS = {"(b)/(a)": ("b", "a"), "(b)/(c)": ("b", "c"), "(a)/(d)": ("a", "d")}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=8, help="sequences decoded together")
    parser.add_argument("--adapters", type=int, default=8, help="distinct adapters in (b), (c)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=12, help="prompt tokens per request")
    parser.add_argument("--steps", type=int, default=16, help="decode steps measured")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved rounds")
    parser.add_argument(
        "--clock", choices=sorted(CLOCKS), default="cpu",
        help="cpu: seconds the decoding thread ran (with one thread, what an unshared core "
        "would take; a shared machine's other work does not count); wall: elapsed seconds",
    )
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default="float32",
        help="serving dtype of base and adapter weights, the same for all four configurations",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return parser.parse_args(argv)


def prompts(model_dir: Path, batch: int, length: int) -> list[list[int]]:
    """`batch` prompts of exactly `length` tokens, encoded as the checkpoint encodes text."""
    encoded = encode_prompts(load_tokenizer(model_dir), list(TEXTS))
    if min(len(ids) for ids in encoded) < length:
        raise SystemExit(f"--prompt-len {length} is longer than the shortest prompt")
    return [encoded[i % len(encoded)][:length] for i in range(batch)]


def engine_decode(
    engine: Engine,
    batch: list[list[int]],
    adapters: list[str] | None,
    steps: int,
    clock: Callable[[], float] = time.perf_counter,
) -> float:
    """Decode tokens/s of one batch run to `steps` decode steps (stop tokens off), in seconds
    of `clock`."""
    for i, prompt_ids in enumerate(batch):
        engine.submit(
            GenerationRequest(
                prompt_ids, adapter_id=None if adapters is None else adapters[i],
                max_new_tokens=steps + 1, stop_token_ids=[],
            )
        )  # fmt: skip
    tokens = seconds = 0.0
    while engine.has_work():
        started = clock()
        results = engine.step()
        spent = clock() - started
        if any(result.status != "ok" for result in results):
            raise SystemExit(f"the engine failed a request: {results[0].error_message}")
        stats = engine.last_step
        if stats.prefill_tokens == 0 and stats.decode_tokens:
            tokens += stats.decode_tokens
            seconds += spent
    return tokens / seconds


def markdown(
    tps: dict[str, float],
    ratios: dict[str, float],
    spread: dict[str, tuple[float, float]],
    repeats: int,
    clock: str,
) -> str:
    names = {
        "a": "(a) this engine, base model",
        "b": "(b) this engine, mixed adapters",
        "c": "(c) transformers + peft, mixed adapters (adapter_names)",
        "d": "(d) transformers, base model",
    }
    lines = [f"| configuration | decode tokens/s by the {clock} (median of {repeats}) |",
             "| --- | ---: |"]
    lines += [f"| {names[key]} | {value:,.1f} |" for key, value in tps.items()]
    lines += [
        "",
        "| ratio | median of per-round ratios | min - max | target |",
        "| --- | ---: | ---: | ---: |",
    ]
    lines += [
        f"| {name} | {value:.2f} | {spread[name][0]:.2f} - {spread[name][1]:.2f} "
        f"| >= {TARGETS[name]} |"
        for name, value in ratios.items()
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    dtype = DTYPES[args.dtype]
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model_dir = smollm2_checkpoint(load_settings().cache_dir)
    config = ModelConfig.from_model_dir(model_dir)
    batch = prompts(model_dir, args.batch, args.prompt_len)
    adapter_ids = [f"bench-r{args.rank}-{i:02d}" for i in range(args.adapters)]
    adapters = [adapter_ids[i % len(adapter_ids)] for i in range(args.batch)]
    decoded = args.batch * args.steps
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp)
        for number, adapter_id in enumerate(adapter_ids):
            write_random_adapter(store, adapter_id, config, rank=args.rank,
                                 targets=LORA_TARGETS, seed=number)  # fmt: skip
        engine = Engine.from_model_dir(
            model_dir, store, dtype=dtype,
            config=EngineConfig(max_batch_size=args.batch,
                                max_seq_len=args.prompt_len + args.steps + 2),
        )  # fmt: skip
        mixed = load_peft(model_dir, store, adapters, dtype)
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
        clock = CLOCKS[args.clock]
        runners: dict[str, Callable[[], float]] = {
            "a": lambda: engine_decode(engine, batch, None, args.steps, clock),
            "b": lambda: engine_decode(engine, batch, adapters, args.steps, clock),
            "c": lambda: decoded / peft_decode(mixed, batch, adapters, args.steps, clock),
            "d": lambda: decoded / peft_decode(base, batch, None, args.steps, clock),
        }
        # Warm-up: adapters loaded into their slots, allocator and caches touched.
        engine_decode(engine, batch, None, 2)
        engine_decode(engine, batch, adapters, 2)
        peft_decode(mixed, batch, adapters, 2)
        peft_decode(base, batch, None, 2)
        rounds = []
        for number in range(args.repeats):
            rounds.append(measure_round(runners, number))
            shown = "  ".join(f"{key} {value:.1f}" for key, value in rounds[-1].items())
            print(f"round {number + 1}/{args.repeats}: {shown} tok/s", file=sys.stderr)
        engine.close()
    tps = {key: statistics.median(r[key] for r in rounds) for key in runners}
    per_round = {
        name: [r[high] / r[low] for r in rounds] for name, (high, low) in RATIOS.items()
    }
    ratios = {name: statistics.median(values) for name, values in per_round.items()}
    spread = {name: (min(values), max(values)) for name, values in per_round.items()}
    print(markdown(tps, ratios, spread, args.repeats, f"{args.clock} clock, {args.dtype}"))
    result = {
        "benchmark": "real_model",
        "model": f"SmolLM2-135M-Instruct (GGUF Q4_1, dequantized, served in {args.dtype})",
        "peers": "transformers + peft (c, d)",
        "args": {k: v.name if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": machine_facts(),
        "decode_tokens_per_s_median": tps,
        "rounds": rounds,
        "ratios_median_of_rounds": ratios,
        "ratios_per_round": per_round,
        "targets": TARGETS,
    }
    write_report(args.out, result)
    return result


if __name__ == "__main__":
    main()
