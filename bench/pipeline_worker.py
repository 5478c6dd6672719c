"""The GPU worker end to end through the real broker: requests in, results out, exactly once.

Many adapters with Zipf popularity; an open-loop Poisson arrival process at a fixed offered
load (requests go out on schedule whether or not earlier ones finished). Reported: requests/s,
tokens/s, end-to-end latency (request sent -> result read by a read-committed consumer),
time to first token (worker side: queue + adapter load + prefill), adapter cache hit rate.
Then the attribution sketch's cost: the same requests published all at once (saturation),
served with the sketch off and always on, in this process, `--repeats` times in alternation;
reported: the median ratio of their throughputs (sketch on / sketch off, the peer compared
with), the same ratio by this process's CPU time per request (less sensitive to other
processes on a shared machine), the sketch's share of the worker's time (time in sketch passes
over the phase's wall time, and the sketching thread's CPU time over the process's), its time
per sketched result, and the bytes of one sketch (raw float32, and as base64 in the event).

    python bench/pipeline_worker.py --adapters 1000 --requests 200 --rate 20 \
        --saturated-requests 1500 --repeats 3

Needs the broker (`loraledger stack up`). Writes bench/results/pipeline_worker.json and
prints a markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "support"))

from random_adapters import write_random_adapter  # noqa: E402

from inference.base_model import build_base_model  # noqa: E402
from inference.config import LORA_TARGETS, LoraServingConfig, ModelConfig  # noqa: E402
from inference.lora_layers import LoraPool  # noqa: E402
from inference.sketch import PROJECTION_KIND, PROJECTION_KINDS  # noqa: E402
from inference.worker.backend import BackendConfig  # noqa: E402
from inference.worker.service import Worker, WorkerConfig  # noqa: E402
from inference.worker.sketching import SketchMode, SketchPolicy  # noqa: E402
from infra.kafka.clients import ensure_topics, make_consumer, make_producer  # noqa: E402
from infra.kafka.events import publish as publish_events  # noqa: E402
from infra.kafka.events import send_event  # noqa: E402
from infra.kafka.provisioning import provision_acls  # noqa: E402
from infra.kafka.security import ADMIN, scram_enabled  # noqa: E402
from infra.keys import worker_registration  # noqa: E402
from infra.settings import Settings, load_settings  # noqa: E402
from schemas.codec import decode  # noqa: E402
from schemas.events import InferenceRequest  # noqa: E402

PROMPTS = [
    "the price of the clay pot is",
    "in the morning the market opens and",
    "a short note about the weather:",
    "the recipe calls for",
    "our river boat leaves at",
]


def zipf_weights(n: int, exponent: float) -> np.ndarray:
    weights = 1.0 / np.arange(1, n + 1) ** exponent
    return weights / weights.sum()


def make_requests(
    args: argparse.Namespace, adapter_ids: list[str], seed: int, count: int
) -> list:
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(adapter_ids), size=count, p=zipf_weights(len(adapter_ids), args.zipf))
    return [
        InferenceRequest(
            adapter_id=adapter_ids[int(pick)],
            prompt=PROMPTS[i % len(PROMPTS)],
            max_new_tokens=args.max_new_tokens,
            seed=i,
        )
        for i, pick in enumerate(picks)
    ]


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


async def run_phase(
    settings: Settings,
    config: WorkerConfig,
    requests: list[InferenceRequest],
    rate: float | None,
    seed: int,
) -> dict:
    """Serve `requests` with one in-process worker. `rate` None: publish all first."""
    settings = replace(settings, topic_prefix=f"bench-{uuid.uuid4().hex[:8]}.")
    # The bench publishes as the client and the worker serves as the worker, as deployed.
    admin = settings.as_principal(ADMIN)
    await ensure_topics(admin, ["requests", "results", "dead-letters", "workers"])
    if scram_enabled(admin):
        await provision_acls(admin)
    consumer = make_consumer(settings, ["results"], group_id=None)
    await consumer.start()
    producer = make_producer(settings)
    await producer.start()
    sent_at: dict[str, float] = {}
    received: dict[str, tuple[float, object]] = {}
    # As `stack up` does (as the admin): results are credited only to a worker whose key is
    # registered.
    await publish_events(admin, [worker_registration(settings.home, config.worker_id)])
    worker = Worker(settings, config)
    worker_task = asyncio.create_task(worker.run())
    rng = random.Random(seed)

    async def publish() -> None:
        if rate is None:
            for request in requests:
                await send_event(producer, settings, request)
            await producer.flush()
            started = time.monotonic()
            for request in requests:
                sent_at[request.request_id] = started
            return
        next_at = time.monotonic()
        for request in requests:
            delay = next_at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            sent_at[request.request_id] = time.monotonic()
            await send_event(producer, settings, request)
            next_at += rng.expovariate(rate)
        await producer.flush()

    async def collect() -> None:
        while len(received) < len(requests):
            batch = await consumer.getmany(timeout_ms=200)
            now = time.monotonic()
            for records in batch.values():
                for record in records:
                    result = decode("results", record.value)
                    received.setdefault(result.request_id, (now, result))
            if worker_task.done():
                worker_task.result()

    # Let the worker load its model and join the group before the clock starts.
    while not worker.partitions:
        if worker_task.done():
            worker_task.result()
        await asyncio.sleep(0.1)
    cpu_started = time.process_time()
    publisher = asyncio.create_task(publish())
    await collect()
    await publisher
    worker.request_stop()
    await worker_task
    await producer.stop()
    await consumer.stop()

    cpu_s = time.process_time() - cpu_started
    registry = worker.metrics.registry
    sketch_s = registry.get_sample_value("loraledger_worker_sketch_batch_seconds_sum") or 0.0
    sketch_cpu_s = registry.get_sample_value("loraledger_worker_sketch_cpu_seconds_total") or 0.0
    results = [result for _, result in received.values()]
    first_sent = min(sent_at.values())
    last_received = max(at for at, _ in received.values())
    elapsed = last_received - first_sent
    ok = [r for r in results if r.status == "ok"]
    tokens = sum(r.usage.completion_tokens for r in ok)
    e2e = [(received[i][0] - sent_at[i]) * 1000 for i in received]
    ttft = [
        r.timings.queue_ms + r.timings.adapter_load_ms + r.timings.prefill_ms
        for r in ok
        if r.timings is not None
    ]
    tiers = [r.cache_tier.value for r in ok]
    sketches = [r.sketch for r in ok if r.sketch is not None]
    return {
        "requests": len(requests),
        "ok": len(ok),
        "errors": len(results) - len(ok),
        "sketched": len(sketches),
        "seconds": elapsed,
        "cpu_ms_per_request": 1000 * cpu_s / len(results),
        "sketch_seconds": sketch_s,
        "sketch_share": sketch_s / elapsed,
        "sketch_cpu_share": sketch_cpu_s / cpu_s,
        "sketch_ms_per_result": 1000 * sketch_s / len(sketches) if sketches else None,
        "sketch_bytes": 4 * sketches[0].k if sketches else None,
        "sketch_bytes_base64": len(sketches[0].values_b64) if sketches else None,
        "requests_per_s": len(results) / elapsed,
        "tokens_per_s": tokens / elapsed,
        "e2e_p50_ms": percentile(e2e, 50),
        "e2e_p99_ms": percentile(e2e, 99),
        "ttft_p50_ms": percentile(ttft, 50),
        "ttft_p99_ms": percentile(ttft, 99),
        "device_hit_rate": tiers.count("device") / len(tiers) if tiers else None,
        "tiers": {tier: tiers.count(tier) for tier in sorted(set(tiers))},
        "mean_completion_tokens": statistics.fmean(r.usage.completion_tokens for r in ok)
        if ok
        else None,
    }


def table(report: dict) -> str:
    rows = [
        ("phase", "req/s", "tok/s", "e2e p50 ms", "e2e p99 ms", "TTFT p50 ms", "TTFT p99 ms",
         "device hit", "sketched", "CPU ms/req", "sketch share (wall, CPU)",
         "sketch ms/result"),
    ]
    for name, phase in report["phases"].items():
        rows.append((
            name,
            f"{phase['requests_per_s']:.1f}",
            f"{phase['tokens_per_s']:.0f}",
            f"{phase['e2e_p50_ms']:.0f}",
            f"{phase['e2e_p99_ms']:.0f}",
            f"{phase['ttft_p50_ms']:.0f}",
            f"{phase['ttft_p99_ms']:.0f}",
            f"{100 * (phase['device_hit_rate'] or 0):.0f}%",
            f"{phase['sketched']}/{phase['ok']}",
            f"{phase['cpu_ms_per_request']:.2f}",
            f"{100 * phase['sketch_share']:.0f}%, {100 * phase['sketch_cpu_share']:.0f}%",
            f"{phase['sketch_ms_per_result']:.2f}" if phase["sketch_ms_per_result"] else "-",
        ))
    lines = ["| " + " | ".join(row) + " |" for row in rows]
    lines.insert(1, "|" + "---|" * len(rows[0]))
    lines.append("")
    ratios = ", ".join(f"{r:.2f}" for r in report["sketch_throughput_ratios"])
    cpu_ratios = ", ".join(f"{r:.2f}" for r in report["sketch_cpu_ratios"])
    lines.append(
        f"Sketch cost: saturated throughput with the sketch always on is "
        f"{report['sketch_throughput_ratio']:.2f}x (median; runs: {ratios}) the throughput "
        f"with it off; by CPU time per request (sketch off / on, less sensitive to other "
        f"processes on the machine) {report['sketch_cpu_ratio']:.2f}x (runs: {cpu_ratios}). "
        f"One sketch: {report['sketch_bytes']} bytes of float32 "
        f"({report['sketch_bytes_base64']} as base64)."
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, default=1000)
    parser.add_argument("--requests", type=int, default=300, help="open-loop requests")
    parser.add_argument("--saturated-requests", type=int, default=None,
                        help="requests of each saturated phase (default: --requests)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="saturated sketch-off/on pairs; the median ratio is reported")
    parser.add_argument("--rate", type=float, default=20.0, help="offered load, requests/s")
    parser.add_argument("--zipf", type=float, default=1.1, help="popularity exponent")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--device-slots", type=int, default=64, help="rank-8 adapter slots")
    parser.add_argument("--index-k", type=int, default=32, help="sketch dimension k")
    parser.add_argument("--projection", default=PROJECTION_KIND, choices=PROJECTION_KINDS,
                        help="the indexes' projection; gaussian-blocked-v1 is sketched one "
                             "pass per adapter, as before the factored projection")
    parser.add_argument("--preset", default="test", help="base model preset: test or default")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/pipeline_worker.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    settings = load_settings()
    with tempfile.TemporaryDirectory(prefix="loraledger-bench-") as tmp:
        home = Path(tmp)
        base = home / "base-model"
        build_base_model(base, settings.cache_dir, args.preset)
        model_config = ModelConfig.from_model_dir(base)
        adapter_ids = [f"adapter-{i:04d}" for i in range(args.adapters)]
        started = time.perf_counter()
        for number, adapter_id in enumerate(adapter_ids):
            write_random_adapter(home / "adapters", adapter_id, model_config, seed=number,
                                 index_examples=8, index_k=args.index_k,
                                 projection=args.projection)
        setup_s = time.perf_counter() - started
        settings = replace(settings, home=home, base_model_dir=base)
        slot_bytes = LoraPool.bytes_per_slot(model_config, 8, LORA_TARGETS, torch.float32)
        classes = len(LoraServingConfig().rank_classes)  # the budget splits evenly across them
        backend = BackendConfig(
            max_batch=args.max_batch,
            max_seq_len=min(256, model_config.max_position_embeddings),
            adapter_memory_bytes=args.device_slots * slot_bytes * classes,
        )

        def config(mode: SketchMode) -> WorkerConfig:
            return WorkerConfig(
                worker_id="bench-worker", device=args.device, backend=backend,
                sketch=SketchPolicy(mode), status_interval_s=3600,
            )

        phases = {}
        phases["open-loop, sketch always"] = asyncio.run(run_phase(
            settings, config(SketchMode.ALWAYS),
            make_requests(args, adapter_ids, 1, args.requests), args.rate, 1,
        ))
        burst = make_requests(args, adapter_ids, 2, args.saturated_requests or args.requests)
        ratios, cpu_ratios = [], []
        for repeat in range(1, args.repeats + 1):
            off = asyncio.run(run_phase(settings, config(SketchMode.OFF), burst, None, 2))
            on = asyncio.run(run_phase(settings, config(SketchMode.ALWAYS), burst, None, 2))
            phases[f"saturated, sketch off #{repeat}"] = off
            phases[f"saturated, sketch always #{repeat}"] = on
            ratios.append(on["requests_per_s"] / off["requests_per_s"])
            cpu_ratios.append(off["cpu_ms_per_request"] / on["cpu_ms_per_request"])

    report = {
        "benchmark": "pipeline_worker",
        "args": {k: v for k, v in vars(args).items() if k != "out"},
        "machine": {"platform": platform.platform(), "torch": torch.__version__,
                    "cuda": torch.cuda.get_device_name() if args.device == "cuda" else None},
        "adapter_setup_s": setup_s,
        "phases": phases,
        "sketch_throughput_ratios": ratios,
        "sketch_throughput_ratio": statistics.median(ratios),
        "sketch_cpu_ratios": cpu_ratios,
        "sketch_cpu_ratio": statistics.median(cpu_ratios),
        "sketch_bytes": phases["open-loop, sketch always"]["sketch_bytes"],
        "sketch_bytes_base64": phases["open-loop, sketch always"]["sketch_bytes_base64"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(table(report))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
