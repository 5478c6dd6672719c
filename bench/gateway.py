"""The OpenAI-compatible gateway's cost: streaming requests at fixed offered loads, every other
one through the gateway over HTTP, the rest produced to Kafka directly from this process.

Both paths serve the same worker, a subprocess (sketch off), and read answers the same way (the
gateway's result router: every partition of `results` and `token-deltas` from the end); the
direct path waits for the broker's acknowledgement like the gateway does. The gateway runs in
this process beside the HTTP client.
Requests arrive open-loop (Poisson) at each rate, alternating between the two paths within one
stream, so both meet the same worker batches and the same spells of a shared machine's load. A
round gives one ratio of the gateway's p50 end-to-end latency to the direct one's; the ratio
reported is the median over `--rounds` rounds, with its spread (target <= 1.10 at 10 req/s).
Also reported per path and rate, pooled over rounds: requests/s, time to first token (first
streamed text) and end-to-end latency (request sent -> result, or `[DONE]`) p50/p99.

    python bench/gateway.py --requests 30 --rounds 6 --rates 5 10

Needs the broker (`loraledger stack up`). Writes bench/results/gateway.json and prints a
markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import replace
from pathlib import Path

import aiohttp
import numpy as np
import torch
from aiohttp import web

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "support"))

from random_adapters import write_random_adapter  # noqa: E402

from inference.adapter_store import AdapterStore  # noqa: E402
from inference.base_model import build_base_model  # noqa: E402
from inference.config import ModelConfig  # noqa: E402
from inference.hashing import base_model_hash  # noqa: E402
from infra.kafka.clients import ensure_topics  # noqa: E402
from infra.kafka.events import publish  # noqa: E402
from infra.kafka.provisioning import provision_acls  # noqa: E402
from infra.kafka.security import ADMIN, scram_enabled  # noqa: E402
from infra.settings import Settings, load_settings  # noqa: E402
from pipeline.gateway.app import GatewayConfig, build_app  # noqa: E402
from pipeline.gateway.kafka_link import KafkaLink  # noqa: E402
from schemas.events import AdapterRegistered, InferenceRequest, InferenceResult  # noqa: E402

PROMPTS = [
    "the price of the clay pot is",
    "in the morning the market opens and",
    "a short note about the weather:",
    "our river boat leaves at",
]
TARGET_RATE = 10.0
TARGET_RATIO = 1.10


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Timing:
    def __init__(self) -> None:
        self.sent: float = 0.0
        self.first_text: float | None = None
        self.done: float | None = None


async def direct_request(link: KafkaLink, body: dict, timing: Timing, timeout_s: float) -> None:
    """Produce the request to Kafka and follow its deltas and result, as a client would."""
    request = InferenceRequest(adapter_id=body["model"], prompt=body["prompt"],
                               max_new_tokens=body["max_tokens"], seed=body["seed"],
                               temperature=body["temperature"], stream=True)
    arrivals = link.router.expect(request.request_id)
    try:
        timing.sent = time.monotonic()
        await link.produce(request)
        deadline = timing.sent + timeout_s
        while True:
            arrival = await asyncio.wait_for(arrivals.get(), deadline - time.monotonic())
            if timing.first_text is None and (
                not isinstance(arrival, InferenceResult) or arrival.output_text
            ):
                timing.first_text = time.monotonic()
            if isinstance(arrival, InferenceResult):
                timing.done = time.monotonic()
                return
    finally:
        link.router.forget(request.request_id)


async def gateway_request(session: aiohttp.ClientSession, url: str, body: dict,
                          timing: Timing) -> None:
    """POST a streaming completion and read its server-sent events to `[DONE]`."""
    timing.sent = time.monotonic()
    async with session.post(f"{url}/v1/completions", json={**body, "stream": True}) as response:
        response.raise_for_status()
        async for line in response.content:
            if not line.startswith(b"data: "):
                continue
            if line.strip() == b"data: [DONE]":
                timing.done = time.monotonic()
                return
            chunk = json.loads(line[6:])
            if timing.first_text is None and chunk["choices"] and chunk["choices"][0]["text"]:
                timing.first_text = time.monotonic()


async def run_load(send, bodies: list[dict], rate: float, seed: int) -> list[Timing]:
    """Send `bodies` open-loop at `rate` requests/s (Poisson); their timings, in order."""
    rng = random.Random(seed)
    timings = [Timing() for _ in bodies]
    tasks = []
    next_at = time.monotonic()
    for body, timing in zip(bodies, timings, strict=True):
        delay = next_at - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(send(body, timing)))
        next_at += rng.expovariate(rate)
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    failures = [o for o in outcomes if isinstance(o, BaseException)]
    if failures:
        raise RuntimeError(f"{len(failures)} requests failed, the first: {failures[0]!r}")
    return timings


def summary(rounds: list[list[Timing]], rate: float) -> dict:
    """Latencies pooled over rounds; requests/s of each round, averaged."""
    done = [t for timings in rounds for t in timings if t.done is not None]
    e2e = [(t.done - t.sent) * 1000 for t in done]
    ttft = [(t.first_text - t.sent) * 1000 for t in done if t.first_text is not None]
    throughputs = [
        len(timings) / (max(t.done for t in timings) - min(t.sent for t in timings))
        for timings in rounds
    ]
    return {
        "offered_rate": rate,
        "requests": sum(len(timings) for timings in rounds),
        "completed": len(done),
        "requests_per_s": float(np.mean(throughputs)),
        "ttft_p50_ms": percentile(ttft, 50),
        "ttft_p99_ms": percentile(ttft, 99),
        "e2e_p50_ms": percentile(e2e, 50),
        "e2e_p99_ms": percentile(e2e, 99),
    }


def start_worker(settings: Settings, args: argparse.Namespace, log: Path) -> subprocess.Popen:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "LORALEDGER_TOPIC_PREFIX": settings.topic_prefix,
        "LORALEDGER_HOME": str(settings.home),
        "LORALEDGER_BASE_MODEL": str(settings.base_model_dir),
        "LORALEDGER_METRICS_PORT": "0",
    }
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "loraledger.cli", "worker", "--worker-id", "bench-worker",
             "--device", args.device, "--max-batch", str(args.max_batch), "--max-seq-len", "128",
             "--threads", str(args.threads), "--sketch", "off"],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
        )


def registrations(adapters_dir: Path, base: Path, adapter_ids: list[str]) -> list:
    store = AdapterStore(adapters_dir)
    return [
        AdapterRegistered(
            adapter_id=adapter_id, owner_id="bench-owner", base_model_hash=base_model_hash(base),
            weights_hash=store.adapter_dir(adapter_id).weights_hash(), rank=8,
            datanet_id="bench-datanet", snapshot_version=0, snapshot_hash="0" * 64,
        )
        for adapter_id in adapter_ids
    ]


async def measure(settings: Settings, args: argparse.Namespace, adapter_ids: list[str],
                  base: Path) -> dict:
    settings = replace(settings, topic_prefix=f"bench-{uuid.uuid4().hex[:8]}.")
    # Topics and ACLs as the admin, as `stack up` makes them; the gateway and the direct path
    # then produce as the client, and the worker serves as the worker.
    admin = settings.as_principal(ADMIN)
    await ensure_topics(admin)
    if scram_enabled(admin):
        await provision_acls(admin)
    await publish(settings, registrations(settings.adapters_dir, base, adapter_ids))
    worker_log = settings.home / "worker.log"
    worker = start_worker(settings, args, worker_log)
    link = KafkaLink(settings)
    link.start()
    runner = web.AppRunner(build_app(settings, GatewayConfig(timeout_s=args.timeout,
                                                             max_in_flight=10_000)))
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    url = f"http://127.0.0.1:{port}"
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=args.timeout))
    try:
        while not (link.ready() and "owns partitions [" in worker_log.read_text()):
            if worker.poll() is not None:
                raise RuntimeError(f"the worker exited:\n{worker_log.read_text()[-2000:]}")
            await asyncio.sleep(0.2)

        def bodies(count: int, seed: int) -> list[dict]:
            return [
                {"model": adapter_ids[(seed + i) % len(adapter_ids)],
                 "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": args.max_new_tokens,
                 "temperature": 0.0, "seed": seed + i}
                for i in range(count)
            ]

        async def either(body: dict, timing: Timing) -> None:
            path, fields = body["path"], {k: v for k, v in body.items() if k != "path"}
            if path == "gateway":
                await gateway_request(session, url, fields, timing)
            else:
                await direct_request(link, fields, timing, args.timeout)

        def on_paths(count: int, seed: int, first: str) -> list[dict]:
            """`count` requests, every other one through the gateway."""
            second = "direct" if first == "gateway" else "gateway"
            return [{**body, "path": (first, second)[i % 2]}
                    for i, body in enumerate(bodies(count, seed))]

        # Warm up both paths and every adapter before any clock starts.
        await run_load(either, on_paths(2 * len(adapter_ids), 0, "direct"), 20.0, 0)
        rows, ratios = [], {}
        for rate in args.rates:
            rounds: dict[str, list[list[Timing]]] = {"direct": [], "gateway": []}
            per_round = []
            for number in range(args.rounds):
                # One open-loop stream whose requests alternate between the paths, so both
                # meet the same worker batches and the same moments of the machine's load;
                # which path goes first alternates between rounds.
                seed = int(rate * 1000) + number
                sent = on_paths(2 * args.requests, seed, ("gateway", "direct")[number % 2])
                timings = await run_load(either, sent, rate, seed)
                for path in rounds:
                    rounds[path].append(
                        [t for t, body in zip(timings, sent, strict=True) if body["path"] == path]
                    )
                per_round.append(p50_e2e(rounds["gateway"][-1]) / p50_e2e(rounds["direct"][-1]))
                print(f"  {rate:g} req/s round {number + 1}: gateway/direct p50 "
                      f"{per_round[-1]:.3f}", file=sys.stderr)
            for path, timings in rounds.items():
                rows.append({"path": path, **summary(timings, rate)})
            ratios[f"{rate:g}"] = {
                "median": float(np.median(per_round)),
                "min": min(per_round),
                "max": max(per_round),
                "rounds": per_round,
            }
        return {"rows": rows, "e2e_p50_ratio": ratios}
    finally:
        await session.close()
        await runner.cleanup()
        await link.stop()
        worker.terminate()
        worker.wait(timeout=60)


def p50_e2e(timings: list[Timing]) -> float:
    return float(np.median([t.done - t.sent for t in timings if t.done is not None]))


def table(report: dict) -> str:
    head = ("path", "offered req/s (both paths)", "req/s (this path)", "TTFT p50 ms",
            "TTFT p99 ms", "e2e p50 ms", "e2e p99 ms")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in report["rows"]:
        cells = [row["path"], f"{row['offered_rate']:g}", f"{row['requests_per_s']:.1f}"]
        cells += [f"{row[k]:.0f}" for k in ("ttft_p50_ms", "ttft_p99_ms", "e2e_p50_ms",
                                            "e2e_p99_ms")]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| offered req/s | gateway / direct p50 e2e, median of rounds | min - max |",
              "|---|---|---|"]
    for rate, ratio in report["e2e_p50_ratio"].items():
        lines.append(f"| {rate} | {ratio['median']:.3f} | {ratio['min']:.3f} - "
                     f"{ratio['max']:.3f} |")
    target = report["e2e_p50_ratio"].get(f"{TARGET_RATE:g}")
    if target is not None:
        verdict = "met" if target["median"] <= TARGET_RATIO else "missed"
        lines.append(f"\ntarget <= {TARGET_RATIO:.2f} at {TARGET_RATE:g} req/s: {verdict}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=30, help="per path, rate and round")
    parser.add_argument("--rounds", type=int, default=6, help="alternations of the two paths")
    parser.add_argument("--rates", type=float, nargs="+", default=[5.0, 10.0])
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--preset", default="test", help="base model preset: test or default")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/gateway.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    settings = load_settings()
    with tempfile.TemporaryDirectory(prefix="loraledger-bench-") as tmp:
        home = Path(tmp)
        base = home / "base-model"
        build_base_model(base, settings.cache_dir, args.preset)
        model_config = ModelConfig.from_model_dir(base)
        adapter_ids = [f"adapter-{i:02d}" for i in range(args.adapters)]
        for number, adapter_id in enumerate(adapter_ids):
            write_random_adapter(home / "adapters", adapter_id, model_config, rank=8,
                                 seed=number)
        settings = replace(settings, home=home, base_model_dir=base)
        measured = asyncio.run(measure(settings, args, adapter_ids, base))

    report = {
        "benchmark": "gateway",
        "args": {k: v for k, v in vars(args).items() if k != "out"},
        "machine": {"platform": platform.platform(), "torch": torch.__version__},
        **measured,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(table(report))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
