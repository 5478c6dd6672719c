"""The worker's compute side, with no Kafka in it: requests in, InferenceResults out.

It owns the engine, the admission scheduler and the sketcher, and is driven by one thread at a
time (the service runs it on a single executor thread). `advance` admits queued requests into
the engine's continuous batch as rows free up, runs steps for a time slice, and turns finished
generations into results; ok results that want a sketch wait until `flush_sketches`, so one
gradient pass covers a batch of results, whatever their adapters.

Adapter residency belongs to the engine: the scheduler ranks requests by the engine's
`adapter_status`, and the adapters of the requests it still holds are handed to the engine's
`expect_adapters`, which prefetches them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from inference.adapter_cache import AdapterStatus
from inference.adapter_store import AdapterStore
from inference.batched_sketch import BatchedSketcher
from inference.config import LoraServingConfig
from inference.engine import Engine, EngineConfig, GenerationRequest, GenerationResult
from inference.sketch import Sketcher
from inference.tokenizer import NoChatTemplate
from inference.worker.metrics import WorkerMetrics
from inference.worker.results import error_result, ok_result
from inference.worker.scheduler import AdmissionScheduler, Residency
from inference.worker.sketching import SketchAttacher, SketchJob, SketchPolicy
from inference.worker.token_stream import TokenStream, settled_text
from schemas.events import ErrorCode, InferenceRequest, InferenceResult, Sketch, TokenDelta
from schemas.ids import AdapterId, new_id

log = logging.getLogger("loraledger.worker")

_RESIDENCY = {
    AdapterStatus.ON_DEVICE: Residency.READY,
    AdapterStatus.IN_HOST: Residency.HOST,
    AdapterStatus.LOADING: Residency.HOST,
    AdapterStatus.ON_DISK: Residency.COLD,
    # These fail at admission without touching a slot: let them out early.
    AdapterStatus.FAILED: Residency.READY,
    AdapterStatus.UNKNOWN: Residency.READY,
}


@dataclass(frozen=True)
class BackendConfig:
    max_batch: int = 32
    max_seq_len: int = 256
    adapter_memory_bytes: int | None = None  # None: sized from the model (slot_plan)
    adapter_load_timeout_s: float = 30.0  # see LoraServingConfig.load_timeout_s
    ready_bonus_s: float = 0.25
    host_bonus_s: float = 0.1
    prefetch_adapters: int = 16  # distinct adapters of queued requests the engine prefetches
    sketch_batch: int = 32  # held ok results (of any adapters) that trigger a sketch pass


@dataclass(frozen=True)
class Completed:
    key: str
    result: InferenceResult


@dataclass
class _Job:
    key: str
    request: InferenceRequest
    enqueued_at: float
    submitted_at: float | None = None


class ServingBackend:
    def __init__(
        self,
        engine: Engine,
        *,
        worker_id: str,
        config: BackendConfig | None = None,
        sketch_policy: SketchPolicy | None = None,
        sketches: SketchAttacher | None = None,
        metrics: WorkerMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.engine = engine
        self.worker_id = worker_id
        self.config = config or BackendConfig()
        self.policy = sketch_policy or SketchPolicy()
        self.sketches = sketches
        self.metrics = metrics or WorkerMetrics()
        self.clock = clock
        self.scheduler: AdmissionScheduler[_Job] = AdmissionScheduler(
            self.config.ready_bonus_s, self.config.host_bonus_s
        )
        self._in_engine: dict[str, _Job] = {}
        self._dropped: set[str] = set()  # in the engine, but no longer wanted
        self._held: list[tuple[_Job, GenerationResult]] = []  # ok, waiting for a sketch
        self._streams: dict[str, TokenStream] = {}  # key -> deltas of a streaming request
        self._deltas: list[TokenDelta] = []

    @classmethod
    def build(
        cls,
        base_model_dir: Path,
        adapters_dir: Path,
        *,
        worker_id: str,
        device: str = "cpu",
        config: BackendConfig | None = None,
        sketch_policy: SketchPolicy | None = None,
        metrics: WorkerMetrics | None = None,
    ) -> ServingBackend:
        """Load the base model for serving (and, unless sketches are off, lazily for gradients)."""
        config = config or BackendConfig()
        policy = sketch_policy or SketchPolicy()
        engine = Engine.from_model_dir(
            base_model_dir,
            adapters_dir,
            device=device,
            config=EngineConfig(max_batch_size=config.max_batch, max_seq_len=config.max_seq_len),
            serving=LoraServingConfig(
                device_budget_bytes=config.adapter_memory_bytes,
                load_timeout_s=config.adapter_load_timeout_s,
            ),
        )
        if engine.codec is None:
            raise ValueError(f"the base model in {base_model_dir} has no tokenizer.json")
        attacher = None
        if policy.mode != "off":
            attacher = SketchAttacher(
                AdapterStore(adapters_dir),
                lambda: Sketcher(base_model_dir, device=device),
                lambda: BatchedSketcher.load(base_model_dir, device),
            )
        return cls(
            engine,
            worker_id=worker_id,
            config=config,
            sketch_policy=policy,
            sketches=attacher,
            metrics=metrics,
        )

    # --- intake ------------------------------------------------------------------------------

    def enqueue(self, request: InferenceRequest, key: str | None = None) -> str:
        """Queue a request; returns its key (the handle its Completed comes back with)."""
        key = key or new_id()
        self.scheduler.push(_Job(key, request, self.clock()), request.adapter_id, self.clock())
        return key

    def drop(self, keys: set[str]) -> None:
        """Forget requests (their partition went to another worker): queued ones leave the
        queue, running ones finish but yield nothing."""
        self.scheduler.remove(lambda job: job.key in keys)
        for key in keys:
            self._streams.pop(key, None)
        self._held = [(job, g) for job, g in self._held if job.key not in keys]
        self._dropped.update(keys & self._in_engine.keys())

    @property
    def pending(self) -> int:
        return len(self.scheduler) + len(self._in_engine) + len(self._held)

    def idle(self) -> bool:
        return self.pending == 0

    # --- running -----------------------------------------------------------------------------

    def advance(self, budget_s: float = 0.05, flush_sketches: bool = False) -> list[Completed]:
        """Admit, step for about `budget_s`, and return what finished."""
        completed: list[Completed] = []
        deadline = self.clock() + budget_s
        while True:
            completed.extend(self._admit())
            if self.engine.has_work():
                finished = self.engine.step()
                self.metrics.observe_step(
                    self.engine.num_running, self.config.max_batch, len(self.scheduler)
                )
                self._stream_progress()
                completed.extend(self._collect(finished))
            if self.clock() >= deadline or not (self.engine.has_work() or self.scheduler):
                break
        if self._held and (flush_sketches or self._should_sketch()):
            completed.extend(self.flush_sketches())
        return completed

    def run_until_idle(self, timeout_s: float = 60.0) -> list[Completed]:
        """Finish everything queued or running (used by tests and when draining)."""
        completed: list[Completed] = []
        deadline = self.clock() + timeout_s
        while self.pending and self.clock() < deadline:
            completed.extend(self.advance(flush_sketches=True))
        return completed

    def take_deltas(self) -> list[TokenDelta]:
        """The token deltas of streaming requests produced since the last call."""
        taken, self._deltas = self._deltas, []
        return taken

    def _stream_progress(self) -> None:
        codec = self.engine.codec
        if not self._streams or codec is None:
            return
        for key, stream in self._streams.items():
            output = self.engine.output_so_far(key)
            if output:
                job = self._in_engine[key]
                stream.advance(settled_text(codec.decode(output), job.request.stop))
                self._deltas.extend(stream.take())

    def _stream_end(self, key: str, generation: GenerationResult) -> None:
        stream = self._streams.pop(key, None)
        if stream is not None and generation.status == "ok":
            stream.advance(generation.output_text or "")
            self._deltas.extend(stream.take())

    def flush_sketches(self) -> list[Completed]:
        held, self._held = self._held, []
        if not held:
            return []
        sketches = {}
        if self.sketches is not None:
            started, started_cpu = time.perf_counter(), time.thread_time()
            sketches = self.sketches.compute(
                [
                    SketchJob(
                        job.key,
                        job.request.adapter_id,
                        job.request.prompt_input,
                        generation.output_text or "",
                    )
                    for job, generation in held
                ]
            )
            self.metrics.sketch_seconds.observe(time.perf_counter() - started)
            self.metrics.sketch_cpu_seconds.inc(time.thread_time() - started_cpu)
        return [
            Completed(job.key, self._ok(job, generation, sketches.get(job.key)))
            for job, generation in held
        ]

    def _should_sketch(self) -> bool:
        # One pass sketches a batch of any mix of adapters: wait only for a full batch.
        if not (self.engine.has_work() or self.scheduler):
            return True
        return len(self._held) >= self.config.sketch_batch

    def _residency(self, adapter_id: AdapterId | None) -> Residency:
        if adapter_id is None:
            return Residency.READY
        return _RESIDENCY[self.engine.adapter_status(adapter_id)]

    def _admit(self) -> list[Completed]:
        room = self.config.max_batch - self.engine.num_running - self.engine.num_waiting
        picked = self.scheduler.take(room, self._residency, self.clock())
        completed = []
        for job in picked:
            failure = self._submit(job)
            if failure is not None:
                completed.append(failure)
        self.engine.expect_adapters(self.scheduler.upcoming_adapters(self.config.prefetch_adapters))
        return completed

    def _submit(self, job: _Job) -> Completed | None:
        request = job.request
        job.submitted_at = self.clock()
        try:
            prompt_ids = self.engine.encode(request.prompt_input)
        except NoChatTemplate as exc:
            return Completed(job.key, self._error(job, ErrorCode.INVALID_PARAMETERS, str(exc)))
        except Exception as exc:  # a prompt the tokenizer rejects is the request's problem
            return Completed(
                job.key,
                self._error(
                    job, ErrorCode.INVALID_PARAMETERS, f"the prompt does not tokenize: {exc}"
                ),
            )
        self._in_engine[job.key] = job
        if request.stream:
            self._streams[job.key] = TokenStream(request.request_id)
        self.engine.submit(
            GenerationRequest(
                prompt_ids=prompt_ids,
                adapter_id=request.adapter_id,
                max_new_tokens=request.max_new_tokens,
                temperature=request.temperature,
                top_p=request.top_p,
                seed=request.seed,
                stop_strings=tuple(request.stop),
                request_id=job.key,
            )
        )
        return None

    def _collect(self, finished: list[GenerationResult]) -> list[Completed]:
        completed = []
        for generation in finished:
            job = self._in_engine.pop(generation.request_id, None)
            if job is None:
                log.error("the engine returned an unknown request %s", generation.request_id)
                continue
            if job.key in self._dropped:
                self._dropped.discard(job.key)
                continue
            self._stream_end(job.key, generation)
            if generation.status == "ok":
                # A sketch is the gradient of an adapter's parameters: the base model has none.
                if (
                    self.sketches is not None
                    and job.request.adapter_id is not None
                    and self.policy.wants(job.request.request_id)
                ):
                    self._held.append((job, generation))
                else:
                    completed.append(Completed(job.key, self._ok(job, generation, None)))
            else:
                completed.append(
                    Completed(
                        job.key,
                        self._error(
                            job,
                            generation.error_code or ErrorCode.INTERNAL,
                            generation.error_message or "generation failed",
                            generation,
                        ),
                    )
                )
        return completed

    def _waited_ms(self, job: _Job) -> float:
        submitted = job.submitted_at if job.submitted_at is not None else self.clock()
        return max(0.0, (submitted - job.enqueued_at) * 1000.0)

    def _ok(
        self, job: _Job, generation: GenerationResult, sketch: Sketch | None
    ) -> InferenceResult:
        return ok_result(
            job.request,
            generation,
            worker_id=self.worker_id,
            base_model_hash=self.engine.base_hash,
            waited_ms=self._waited_ms(job),
            sketch=sketch,
        )

    def _error(
        self, job: _Job, code: ErrorCode, message: str, generation: GenerationResult | None = None
    ) -> InferenceResult:
        return error_result(
            job.request,
            code,
            message,
            worker_id=self.worker_id,
            base_model_hash=self.engine.base_hash,
            timings=generation.timings if generation is not None else None,
            waited_ms=self._waited_ms(job),
        )

    def close(self) -> None:
        self.engine.close()
