"""Multi-LoRA serving benchmark on the CPU: this engine against peft.

Registers many random PEFT adapters (ranks mixed 8/16/32) in a temporary store, draws requests
with Zipf popularity and measures decode tokens/s for
  (a) the base model alone (this engine, no adapters),
  (b) this engine with every request on its own adapter (continuous batching, tiered cache),
  (c) peft's mixed-adapter batch (`adapter_names=[...]` on a PeftModel holding the adapters),
  (d) peft switching adapters one request at a time,
plus adapter cold-load p50/p99 and the device-slot hit rate. Ratios are against (a), measured
in the same process. Prints a markdown table and writes JSON.

At the tiny default shape (hidden 64) the LoRA arithmetic alone is a large share of the base
model's, so (b)/(a) is bounded well below 1 whatever the engine does. Each (b)/(a) ratio is
printed next to its FLOP ceiling, base MACs / (base + LoRA MACs) per decode token for the
workload's rank mix and the engine's pool layout, so the gap that is overhead (ceiling minus
measured) reads apart from the gap that is arithmetic (1 minus ceiling). Extra shapes, the base
model preset `default` (hidden 128, 4 layers) and a large one (hidden 1024), repeat (a) and (b)
with fewer adapters and requests.

    python bench/multi_lora.py                      # defaults: 1000 adapters, batch 32
    python bench/multi_lora.py --adapters 100 --requests 64 --steps 8 --extra-shapes ""  # quick
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "support"))

from bench_report import machine_facts, write_report  # noqa: E402

from inference.adapter_cache import AdapterCache  # noqa: E402
from inference.adapter_store import AdapterStore  # noqa: E402
from inference.adapters import save_peft_adapter  # noqa: E402
from inference.base_model import PRESETS as BASE_PRESETS  # noqa: E402
from inference.config import LORA_TARGETS, LoraServingConfig, ModelConfig  # noqa: E402
from inference.engine import Engine, EngineConfig, GenerationRequest  # noqa: E402
from inference.model import load_model  # noqa: E402

RANKS = (8, 16, 32)
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "multi_lora.json"
_DEFAULT_BASE = BASE_PRESETS["default"]
# Model shapes measured after the main run, (a) and (b) only, as overrides of the tiny preset.
EXTRA_SHAPES: dict[str, dict[str, int]] = {
    "default": {
        "hidden_size": _DEFAULT_BASE.hidden_size,
        "num_layers": _DEFAULT_BASE.num_layers,
        "intermediate_size": _DEFAULT_BASE.intermediate_size,
        "num_heads": _DEFAULT_BASE.num_heads,
        "num_kv_heads": _DEFAULT_BASE.num_kv_heads,
        "vocab_size": _DEFAULT_BASE.vocab_size,
    },
    "large": {
        "hidden_size": 1024,
        "num_layers": 2,
        "intermediate_size": 2816,
        "num_heads": 16,
        "num_kv_heads": 4,
        "vocab_size": 2048,
    },
}


@dataclass(frozen=True)
class Workload:
    prompts: list[list[int]]
    adapters: list[str]  # one per request, Zipf-drawn
    max_new_tokens: list[int]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, default=1000, help="adapters in the store")
    parser.add_argument("--requests", type=int, default=512, help="requests for (a) and (b)")
    parser.add_argument("--batch", type=int, default=32, help="sequences decoding at once")
    parser.add_argument("--steps", type=int, default=24, help="decode steps timed for (c), (d)")
    parser.add_argument("--switch-requests", type=int, default=6, help="requests timed for (d)")
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--min-new", type=int, default=16, help="fewest new tokens per request")
    parser.add_argument("--max-new", type=int, default=48, help="most new tokens per request")
    parser.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent of popularity")
    parser.add_argument("--device-slots", type=int, default=96, help="device slots per rank")
    parser.add_argument("--preset", default="tiny", help="model preset (inference.config)")
    for name in (
        "hidden-size",
        "num-layers",
        "intermediate-size",
        "num-heads",
        "num-kv-heads",
        "vocab-size",
    ):
        parser.add_argument(f"--{name}", type=int, default=None, help="override the preset")
    parser.add_argument("--targets", default=",".join(LORA_TARGETS), help="adapted projections")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument(
        "--fuse",
        choices=("auto", "on", "off"),
        default="auto",
        help="one LoRA call per fused q|k|v and gate|up layer, or per projection",
    )
    parser.add_argument(
        "--extra-shapes",
        default=",".join(EXTRA_SHAPES),
        help=f"extra (a)/(b) rows on these shapes ({', '.join(EXTRA_SHAPES)}; '' for none)",
    )
    parser.add_argument("--extra-adapters", type=int, default=60, help="adapters per extra shape")
    parser.add_argument("--extra-requests", type=int, default=64, help="requests per extra shape")
    parser.add_argument("--extra-max-new", type=int, default=24, help="max new tokens, extras")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    unknown = {s for s in args.extra_shapes.split(",") if s} - set(EXTRA_SHAPES)
    if unknown:
        parser.error(f"unknown extra shapes {sorted(unknown)}; known: {', '.join(EXTRA_SHAPES)}")
    return args


# --- setup ------------------------------------------------------------------------------------


def save_base_model(config: ModelConfig, directory: Path, seed: int) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    hf = LlamaForCausalLM(LlamaConfig(**config.to_hf_config()))
    hf.save_pretrained(directory, safe_serialization=True)


def write_adapters(
    config: ModelConfig, store: Path, count: int, targets: tuple[str, ...], seed: int
) -> list[str]:
    generator = torch.Generator().manual_seed(seed)
    ids = []
    for index in range(count):
        rank = RANKS[index % len(RANKS)]
        modules = {}
        for layer in range(config.num_layers):
            for target in targets:
                in_features, out_features = config.projection_shape(target)
                a = torch.randn(rank, in_features, generator=generator) * 0.05
                b = torch.randn(out_features, rank, generator=generator) * 0.05
                modules[(layer, target)] = (a, b)
        adapter_id = f"bench-{index:04d}-r{rank}"
        save_peft_adapter(store / adapter_id, modules, lora_alpha=2 * rank)
        ids.append(adapter_id)
    return ids


def zipf_draws(ids: list[str], n: int, exponent: float, generator: torch.Generator) -> list[str]:
    # Popularity ranks are shuffled so rank classes are not tied to popularity.
    order = torch.randperm(len(ids), generator=generator).tolist()
    weights = torch.tensor([1.0 / (k + 1) ** exponent for k in range(len(ids))])
    picks = torch.multinomial(weights, n, replacement=True, generator=generator).tolist()
    return [ids[order[p]] for p in picks]


def make_workload(args: argparse.Namespace, ids: list[str], vocab: int) -> Workload:
    generator = torch.Generator().manual_seed(args.seed + 1)
    prompts = [
        torch.randint(0, vocab, (args.prompt_len,), generator=generator).tolist()
        for _ in range(args.requests)
    ]
    lengths = torch.randint(
        args.min_new, args.max_new + 1, (args.requests,), generator=generator
    ).tolist()
    return Workload(prompts, zipf_draws(ids, args.requests, args.zipf, generator), lengths)


# --- (a) and (b): this engine -----------------------------------------------------------------


def run_engine(engine: Engine, workload: Workload, use_adapters: bool, batch: int) -> dict:
    """Continuous batching: keep `batch` sequences running, submit the next request whenever
    one finishes. Decode tokens/s counts steps that ran decode tokens only."""
    pending = list(range(len(workload.prompts)))
    decode_tokens = decode_seconds = 0.0
    generated = 0
    started = time.perf_counter()
    in_flight = 0
    errors = 0
    while pending or engine.has_work():
        while pending and in_flight < batch:
            i = pending.pop(0)
            engine.submit(
                GenerationRequest(
                    workload.prompts[i],
                    adapter_id=workload.adapters[i] if use_adapters else None,
                    max_new_tokens=workload.max_new_tokens[i],
                    stop_token_ids=[],
                )
            )
            in_flight += 1
        finished = engine.step()
        stats = engine.last_step
        if stats.prefill_tokens == 0 and stats.decode_tokens:
            decode_tokens += stats.decode_tokens
            decode_seconds += stats.seconds
        for result in finished:
            in_flight -= 1
            errors += result.status != "ok"
            generated += result.usage.completion_tokens
    total = time.perf_counter() - started
    return {
        "decode_tokens_per_s": decode_tokens / decode_seconds if decode_seconds else 0.0,
        "end_to_end_tokens_per_s": generated / total,
        "generated_tokens": generated,
        "seconds": total,
        "errors": errors,
    }


# --- (c) and (d): peft ------------------------------------------------------------------------


def load_peft(
    model_dir: Path, store: Path, adapter_ids: list[str], dtype: torch.dtype = torch.float32
):
    """transformers + peft with every adapter loaded; base and adapter weights in `dtype`."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=dtype).eval()
    unique = list(dict.fromkeys(adapter_ids))
    model = PeftModel.from_pretrained(base, store / unique[0], adapter_name=unique[0])
    for adapter_id in unique[1:]:
        model.load_adapter(store / adapter_id, adapter_name=adapter_id)
    # peft keeps adapter weights in float32 by default; cast them to the base's dtype.
    return model.to(dtype).eval()


@torch.inference_mode()
def peft_decode(model, prompts: list[list[int]], adapter_names: list[str] | None, steps: int,
                clock: Callable[[], float] = time.perf_counter):
    """Prefill, then `steps` greedy decode steps with the KV cache; returns decode seconds by
    `clock`."""
    kwargs = {} if adapter_names is None else {"adapter_names": adapter_names}
    input_ids = torch.tensor(prompts)
    out = model(input_ids=input_ids, use_cache=True, **kwargs)
    past, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    started = clock()
    for _ in range(steps):
        out = model(input_ids=token, past_key_values=past, use_cache=True, **kwargs)
        past, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    return clock() - started


# --- FLOP ceiling -----------------------------------------------------------------------------


def base_macs_per_token(config: ModelConfig, context: float) -> float:
    """Multiply-adds of one decode token through the base model at a given context length."""
    linear = sum(
        math.prod(config.projection_shape(target))
        for target in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    )
    attention = 2 * config.num_heads * config.head_dim * context  # q.k and p.v
    return config.num_layers * (linear + attention) + config.hidden_size * config.vocab_size


def lora_macs_per_token(config: ModelConfig, targets: tuple[str, ...], rank: int) -> float:
    """Multiply-adds of one token's LoRA delta: rank * (in + out) per adapted projection, fused
    or not (a fused layer expands each member over its own columns only)."""
    per_layer = 0
    for target in targets:
        in_features, out_features = config.projection_shape(target)
        per_layer += rank * (in_features + out_features)
    return config.num_layers * per_layer


def flop_ceiling(
    config: ModelConfig, targets: tuple[str, ...], workload: Workload, prompt_len: int
) -> float:
    """Highest (b)/(a) decode throughput ratio if both ran at the same FLOP rate: base MACs over
    base + LoRA MACs, summed over the workload's decode tokens (ranks from adapter ids)."""
    base = lora = 0.0
    for adapter_id, new_tokens in zip(workload.adapters, workload.max_new_tokens, strict=True):
        rank = int(adapter_id.rsplit("-r", 1)[1])
        context = prompt_len + new_tokens / 2
        base += new_tokens * base_macs_per_token(config, context)
        lora += new_tokens * lora_macs_per_token(config, targets, rank)
    return base / (base + lora)


# --- one model shape --------------------------------------------------------------------------


def run_shape(args: argparse.Namespace, config: ModelConfig, with_peft: bool) -> dict:
    """(a), (b), (a) again on one model shape; with_peft adds (c) and (d)."""
    targets = tuple(t for t in args.targets.split(",") if t)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir, store = root / "base", root / "adapters"
        save_base_model(config, model_dir, args.seed)
        t0 = time.perf_counter()
        ids = write_adapters(config, store, args.adapters, targets, args.seed)
        print(f"wrote {len(ids)} adapters in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        workload = make_workload(args, ids, config.vocab_size)
        engine_config = EngineConfig(
            max_batch_size=args.batch, max_seq_len=args.prompt_len + args.max_new + 1
        )
        model = load_model(model_dir, max_seq_len=engine_config.max_seq_len)
        serving = LoraServingConfig(
            rank_classes=RANKS,
            slots_per_class=(args.device_slots,) * len(RANKS),
            target_modules=targets,
            host_budget_bytes=256 << 20,
            fuse_projections={"auto": None, "on": True, "off": False}[args.fuse],
        )
        cache = AdapterCache(AdapterStore(store), model.config, serving)

        base = run_engine(Engine(model, None, engine_config), workload, False, args.batch)
        print(f"(a) {base['decode_tokens_per_s']:.0f} tok/s", file=sys.stderr)
        multi = run_engine(Engine(model, cache, engine_config), workload, True, args.batch)
        print(f"(b) {multi['decode_tokens_per_s']:.0f} tok/s", file=sys.stderr)
        cache_stats = cache.stats()
        fused = cache.fuse_projections
        cache.close()
        # The same base run again, so drift on a shared machine shows up in the numbers.
        base_again = run_engine(Engine(model, None, engine_config), workload, False, args.batch)
        base_tps = statistics.mean([base["decode_tokens_per_s"], base_again["decode_tokens_per_s"]])
        result = {
            "config": config,
            "workload": workload,
            "a": base,
            "a_again": base_again,
            "a_tps": base_tps,
            "b": multi,
            "b_over_a": multi["decode_tokens_per_s"] / base_tps,
            "flop_ceiling": flop_ceiling(config, targets, workload, args.prompt_len),
            "fused": fused,
            "cache": cache_stats,
        }
        if with_peft:
            result.update(run_peft(args, model_dir, store, workload))
    return result


def run_peft(args: argparse.Namespace, model_dir: Path, store: Path, workload: Workload) -> dict:
    batch_prompts = workload.prompts[: args.batch]
    batch_adapters = workload.adapters[: args.batch]
    t0 = time.perf_counter()
    peft = load_peft(model_dir, store, batch_adapters)
    peft_load_s = time.perf_counter() - t0
    mixed_s = peft_decode(peft, batch_prompts, batch_adapters, args.steps)
    peft_mixed = args.batch * args.steps / mixed_s
    print(f"(c) {peft_mixed:.0f} tok/s", file=sys.stderr)
    switch_s = 0.0
    for prompt, adapter_id in list(zip(batch_prompts, batch_adapters, strict=True))[
        : args.switch_requests
    ]:
        peft.set_adapter(adapter_id)
        switch_s += peft_decode(peft, [prompt], None, args.steps)
    peft_switch = args.switch_requests * args.steps / switch_s
    print(f"(d) {peft_switch:.0f} tok/s", file=sys.stderr)
    return {
        "c_tps": peft_mixed,
        "d_tps": peft_switch,
        "peft_load_seconds": peft_load_s,
        "peft_adapters_loaded": len(set(batch_adapters)),
    }


# --- report -----------------------------------------------------------------------------------


def markdown(
    rows: list[tuple[str, float, float | None]], extra: dict, shapes: dict[str, dict]
) -> str:
    lines = ["| configuration | decode tokens/s | vs (a) |", "| --- | ---: | ---: |"]
    for name, tps, ratio in rows:
        lines.append(f"| {name} | {tps:,.0f} | {'-' if ratio is None else f'{ratio:.2f}x'} |")
    lines.append("")
    lines.extend(f"- {key}: {value}" for key, value in extra.items())
    lines += [
        "",
        "| shape (hidden / layers / intermediate) | (a) tok/s | (b) tok/s | (b)/(a) "
        "| FLOP ceiling of (b)/(a) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, run in shapes.items():
        config = run["config"]
        lines.append(
            f"| {name} ({config.hidden_size} / {config.num_layers} / "
            f"{config.intermediate_size}) | {run['a_tps']:,.0f} | "
            f"{run['b']['decode_tokens_per_s']:,.0f} | {run['b_over_a']:.2f}x | "
            f"{run['flop_ceiling']:.2f}x |"
        )
    return "\n".join(lines)


def shown_path(path: Path) -> str:
    """A path as the report records it: relative to the project, never the machine's layout."""
    try:
        return str(path.resolve().relative_to(Path(__file__).resolve().parents[1]))
    except ValueError:
        return path.name


def shape_json(run: dict) -> dict:
    return {
        "model": run["config"].to_hf_config(),
        "fused_projections": run["fused"],
        "a_base": run["a_tps"],
        "a_base_runs": [run["a"]["decode_tokens_per_s"], run["a_again"]["decode_tokens_per_s"]],
        "b_engine_multi_lora": run["b"]["decode_tokens_per_s"],
        "b_over_a": run["b_over_a"],
        "flop_ceiling_b_over_a": run["flop_ceiling"],
        "device_hit_rate": run["cache"]["device_hit_rate"],
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    overrides = {
        field: getattr(args, field)
        for field in (
            "hidden_size",
            "num_layers",
            "intermediate_size",
            "num_heads",
            "num_kv_heads",
            "vocab_size",
        )
        if getattr(args, field) is not None
    }
    config = replace(ModelConfig.from_preset(args.preset), **overrides)
    main_run = run_shape(args, config, with_peft=True)
    shapes = {"main": main_run}
    for name in (s for s in args.extra_shapes.split(",") if s):
        print(f"extra shape {name}", file=sys.stderr)
        extra_args = argparse.Namespace(
            **{
                **vars(args),
                "adapters": args.extra_adapters,
                "requests": args.extra_requests,
                "max_new": max(args.extra_max_new, args.min_new),
                "device_slots": min(args.device_slots, args.extra_adapters),
            }
        )
        shapes[name] = run_shape(
            extra_args, replace(ModelConfig.from_preset("tiny"), **EXTRA_SHAPES[name]), False
        )

    base_tps, multi = main_run["a_tps"], main_run["b"]
    peft_mixed, peft_switch = main_run["c_tps"], main_run["d_tps"]
    workload, cache_stats = main_run["workload"], main_run["cache"]
    rows = [
        ("(a) base model, no LoRA (this engine)", base_tps, 1.0),
        ("(b) this engine, mixed adapters", multi["decode_tokens_per_s"], None),
        ("(c) peft mixed batch (adapter_names)", peft_mixed, None),
        ("(d) peft, one request at a time", peft_switch, None),
    ]
    rows = [(name, tps, tps / base_tps) for name, tps, _ in rows]
    disk_ms = cache_stats["disk_load_ms"]
    upload_ms = cache_stats["upload_ms"]
    distinct_in_batch = main_run["peft_adapters_loaded"]
    summary = {
        "adapter cold-load (disk -> host, read + validate) p50 / p99 ms": (
            f"{disk_ms['p50_ms']:.2f} / {disk_ms['p99_ms']:.2f}"
        ),
        "host -> device slot upload p50 / p99 ms": (
            f"{upload_ms['p50_ms']:.3f} / {upload_ms['p99_ms']:.3f}"
        ),
        "device-slot hit rate": (
            f"{cache_stats['device_hit_rate']:.3f} ({len(set(workload.adapters))} distinct "
            f"adapters in {len(workload.adapters)} requests: first uses always miss)"
        ),
        "(b) over (a), FLOP ceiling": (
            f"{main_run['b_over_a']:.2f}x measured, {main_run['flop_ceiling']:.2f}x ceiling"
        ),
        "(b) over (c)": f"{multi['decode_tokens_per_s'] / peft_mixed:.1f}x",
        "distinct adapters in the (c) batch": distinct_in_batch,
    }
    print(markdown(rows, summary, shapes))
    result = {
        "benchmark": "multi_lora",
        "args": {k: shown_path(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "model": {"preset": args.preset, **config.to_hf_config()},
        "machine": machine_facts(),
        "decode_tokens_per_s": {
            "a_base": base_tps,
            "a_base_runs": [
                main_run["a"]["decode_tokens_per_s"],
                main_run["a_again"]["decode_tokens_per_s"],
            ],
            "b_engine_multi_lora": multi["decode_tokens_per_s"],
            "c_peft_mixed_batch": peft_mixed,
            "d_peft_switching": peft_switch,
        },
        "ratios_vs_a": {name: ratio for name, _, ratio in rows},
        "flop_ceiling_b_over_a": main_run["flop_ceiling"],
        "b_over_c": multi["decode_tokens_per_s"] / peft_mixed,
        "engine_runs": {"a": main_run["a"], "a_again": main_run["a_again"], "b": multi},
        "cache": cache_stats,
        "peft_adapters_loaded": distinct_in_batch,
        "peft_load_seconds": main_run["peft_load_seconds"],
        "shapes": {name: shape_json(run) for name, run in shapes.items()},
    }
    write_report(args.out, result)
    return result


if __name__ == "__main__":
    main()
