"""The worker's Prometheus metrics and its one-line status log.

Each worker has its own registry, so several workers (or tests) in one process do not share
counters; `serve` exposes it over HTTP."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from schemas.events import InferenceResult

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
OCCUPANCY_BUCKETS = (0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "loraledger_worker_requests",
            "Results committed, by status and error code",
            ["status", "error_code"],
            registry=r,
        )
        self.tokens = Counter(
            "loraledger_worker_tokens", "Tokens of committed ok results", ["kind"], registry=r
        )
        self.latency = Histogram(
            "loraledger_worker_request_latency_seconds",
            "From consuming a request to committing its result",
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.time_to_first_token = Histogram(
            "loraledger_worker_time_to_first_token_seconds",
            "Queue, adapter load and prefill of ok results",
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.decode = Histogram(
            "loraledger_worker_decode_seconds",
            "Decode time of ok results",
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.cache_hits = Counter(
            "loraledger_worker_adapter_cache_hits",
            "Where each ok result's adapter was when its request was admitted",
            ["tier"],
            registry=r,
        )
        self.batch_occupancy = Histogram(
            "loraledger_worker_batch_occupancy",
            "Running sequences / batch size, per step",
            buckets=OCCUPANCY_BUCKETS,
            registry=r,
        )
        self.running = Gauge(
            "loraledger_worker_running_sequences", "Sequences in the engine's batch", registry=r
        )
        self.queued = Gauge(
            "loraledger_worker_queued_requests", "Requests waiting for the engine", registry=r
        )
        self.dead_letters = Counter(
            "loraledger_worker_dead_letters",
            "Undecodable requests sent to dead-letters",
            registry=r,
        )
        self.transactions = Counter(
            "loraledger_worker_transactions",
            "Kafka transactions, by outcome",
            ["outcome"],
            registry=r,
        )
        self.sketches = Counter(
            "loraledger_worker_sketches", "Attribution sketches attached to results", registry=r
        )
        self.sketch_seconds = Histogram(
            "loraledger_worker_sketch_batch_seconds",
            "Time to sketch one batch",
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.sketch_cpu_seconds = Counter(
            "loraledger_worker_sketch_cpu_seconds",
            "CPU time of the thread computing sketches, spent on them",
            registry=r,
        )
        self._started = time.monotonic()
        self._last_status: tuple[float, int, int] = (self._started, 0, 0)
        self.committed_results = 0
        self.committed_tokens = 0
        self.device_hits = 0
        self.adapter_admissions = 0
        self._last_step = (0, 0)

    def serve(self, port: int) -> None:
        """Expose the registry at http://0.0.0.0:port/metrics."""
        start_http_server(port, registry=self.registry)

    def observe_committed(self, result: InferenceResult, latency_s: float) -> None:
        error = result.error_code.value if result.error_code is not None else ""
        self.requests.labels(result.status, error).inc()
        self.latency.observe(latency_s)
        self.committed_results += 1
        if result.status != "ok":
            return
        usage = result.usage
        self.tokens.labels("prompt").inc(usage.prompt_tokens)
        self.tokens.labels("completion").inc(usage.completion_tokens)
        self.committed_tokens += usage.completion_tokens
        self.cache_hits.labels(result.cache_tier.value).inc()
        if result.cache_tier.value != "none":
            self.adapter_admissions += 1
            self.device_hits += result.cache_tier.value == "device"
        if result.timings is not None:
            t = result.timings
            self.time_to_first_token.observe(
                (t.queue_ms + t.adapter_load_ms + t.prefill_ms) / 1000.0
            )
            self.decode.observe(t.decode_ms / 1000.0)
        if result.sketch is not None:
            self.sketches.inc()

    def observe_step(self, running: int, batch_size: int, queued: int) -> None:
        self.batch_occupancy.observe(running / batch_size if batch_size else 0.0)
        self.running.set(running)
        self.queued.set(queued)
        self._last_step = (running, queued)

    def status_line(self, worker_id: str, partitions: list[int], pending: int) -> str:
        """One line: what the worker holds and its rates since the previous line."""
        now = time.monotonic()
        then, results_then, tokens_then = self._last_status
        elapsed = max(now - then, 1e-9)
        self._last_status = (now, self.committed_results, self.committed_tokens)
        hit_rate = (
            f"{100.0 * self.device_hits / self.adapter_admissions:.0f}%"
            if self.adapter_admissions
            else "-"
        )
        return (
            f"worker {worker_id}: partitions={partitions} pending={pending} "
            f"running={self._last_step[0]} queued={self._last_step[1]} "
            f"results={self.committed_results} "
            f"req/s={(self.committed_results - results_then) / elapsed:.1f} "
            f"tok/s={(self.committed_tokens - tokens_then) / elapsed:.1f} "
            f"device-hit={hit_rate}"
        )
