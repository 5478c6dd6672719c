"""The generation engine: continuous batching of many adapters over one base model.

Requests queue on `submit`; every `step` admits what fits (a free KV row and a device slot for
the adapter), prefetches the adapters of those still waiting and of those the caller expects to
submit, runs ONE forward pass over every running sequence (prompt chunks of new sequences and
one decode token of the others, each with its own adapter or none), samples, and returns the
requests that finished. Nothing raises out of `step`: bad requests come back as results with an
error code.

The engine owns adapter residency: its adapter cache is private, and callers that schedule
requests ahead of it ask `adapter_status` and announce what comes next with `expect_adapters`.
Adapter ids arrive validated (`schemas.ids.AdapterId`).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from itertools import islice
from pathlib import Path
from typing import Literal

import torch

from inference.adapter_cache import Acquired, AdapterCache, AdapterStatus, NoFreeSlot
from inference.adapter_store import AdapterRefused, AdapterStore, UnknownAdapter
from inference.config import LoraServingConfig
from inference.hashing import base_model_hash
from inference.lora_layers import build_active_lora
from inference.model import ForwardBatch, SequenceChunk, Transformer, load_model
from inference.sampling import SamplingParams, sample_tokens
from inference.text_codec import TextCodec
from inference.tokenizer import Prompt
from schemas.events import CacheTier, ErrorCode, Timings, Usage
from schemas.ids import AdapterId, is_valid_id, new_id


@dataclass(frozen=True)
class EngineConfig:
    max_batch_size: int = 32  # sequences running at once (KV cache rows)
    max_seq_len: int = 512  # prompt plus completion, per sequence
    max_prefill_tokens: int = 512  # prompt tokens per forward pass; longer prompts go in chunks
    prefetch_depth: int = 64  # queued requests whose adapters are prefetched

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or self.max_seq_len < 2 or self.max_prefill_tokens < 1:
            raise ValueError("max_batch_size, max_prefill_tokens >= 1 and max_seq_len >= 2")


@dataclass
class GenerationRequest:
    prompt_ids: Sequence[int]
    adapter_id: AdapterId | None = None  # None: the base model alone
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop_token_ids: Sequence[int] | None = None  # None: the model's end-of-sequence ids
    stop_strings: Sequence[str] = ()  # needs a tokenizer
    request_id: str = field(default_factory=new_id)


@dataclass
class GenerationResult:
    request_id: str
    adapter_id: AdapterId | None
    status: Literal["ok", "error"]
    error_code: ErrorCode | None = None
    error_message: str | None = None
    prompt_ids: list[int] = field(default_factory=list)
    output_ids: list[int] = field(default_factory=list)
    output_text: str | None = None  # when the engine has a tokenizer
    finish_reason: Literal["stop", "length"] | None = None
    usage: Usage = field(default_factory=lambda: Usage(prompt_tokens=0, completion_tokens=0))
    timings: Timings | None = None
    cache_tier: CacheTier = CacheTier.NONE
    adapter_version: str | None = None  # the adapter hash (config and weights) that served it


@dataclass(frozen=True)
class StepStats:
    """What the last step did, for metrics and benchmarks."""

    prefill_tokens: int = 0
    decode_tokens: int = 0
    sequences: int = 0
    seconds: float = 0.0


@dataclass(frozen=True)
class RequestHandle:
    request_id: str


@dataclass
class _Sequence:
    request: GenerationRequest
    sampling: SamplingParams
    generator: torch.Generator
    stop_ids: frozenset[int]
    max_new_tokens: int  # after clamping to the KV cache length
    submitted: float
    kv_row: int = -1
    acquired: Acquired | None = None
    tokens: list[int] = field(default_factory=list)  # prompt then completion
    num_cached: int = 0  # tokens whose keys and values are in the cache
    admitted: float = 0.0
    adapter_load_s: float = 0.0
    first_token_at: float | None = None

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.tokens[self.prompt_len :]


class Engine:
    def __init__(
        self,
        model: Transformer,
        adapters: AdapterCache | None,
        config: EngineConfig | None = None,
        *,
        codec: TextCodec | None = None,
        base_hash: str | None = None,
    ) -> None:
        self.model = model
        self._adapters = adapters
        self.config = config or EngineConfig()
        self.codec = codec
        self.base_hash = base_hash
        self.cache = model.new_cache(self.config.max_batch_size, self.config.max_seq_len)
        self.max_seq_len = self.cache.max_seq_len
        self._eos = frozenset(model.config.eos_token_ids)
        self._waiting: deque[_Sequence] = deque()
        self._running: list[_Sequence] = []
        self._done: list[GenerationResult] = []
        self._expected: list[AdapterId] = []  # adapters of requests the caller will submit
        self.last_step = StepStats()

    @classmethod
    def from_model_dir(
        cls,
        model_dir: Path,
        adapters_dir: Path | None,
        *,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        config: EngineConfig | None = None,
        serving: LoraServingConfig | None = None,
    ) -> Engine:
        """An engine over a Hugging Face checkpoint and an adapter store directory."""
        config = config or EngineConfig()
        model = load_model(model_dir, dtype=dtype, device=device, max_seq_len=config.max_seq_len)
        base_hash = base_model_hash(model_dir)
        cache = None
        if adapters_dir is not None:
            cache = AdapterCache(
                AdapterStore(adapters_dir),
                model.config,
                serving,
                dtype=dtype,
                device=device,
                base_model_hash=base_hash,
            )
        codec = TextCodec.from_model_dir(model_dir)
        return cls(model, cache, config, codec=codec, base_hash=base_hash)

    # --- public API --------------------------------------------------------------------------

    def submit(self, request: GenerationRequest) -> RequestHandle:
        """Queue a request. Invalid ones finish at the next step with an error result."""
        now = time.perf_counter()
        sampling = SamplingParams(request.temperature, request.top_p, request.seed)
        problem = self._problem(request, sampling)
        if problem is not None:
            code, message = problem
            self._done.append(self._error(request, code, message, now))
            return RequestHandle(request.request_id)
        stop_ids = (
            self._eos if request.stop_token_ids is None else frozenset(request.stop_token_ids)
        )
        room = self.max_seq_len - len(request.prompt_ids)
        self._waiting.append(
            _Sequence(
                request=request,
                sampling=sampling,
                generator=sampling.new_generator(),
                stop_ids=stop_ids,
                max_new_tokens=min(request.max_new_tokens, room),
                submitted=now,
                tokens=list(request.prompt_ids),
            )
        )
        return RequestHandle(request.request_id)

    def step(self) -> list[GenerationResult]:
        """Admit, run one forward pass, sample; returns the requests that finished."""
        started = time.perf_counter()
        self.last_step = StepStats()
        try:
            self._admit()
            self._prefetch()
            if self._running:
                self._forward_and_sample()
        except Exception as exc:  # one bad pass must not take the serving loop down
            for seq in list(self._running):
                self._finish_error(seq, ErrorCode.INTERNAL, f"generation failed: {exc}")
        self.last_step = replace(self.last_step, seconds=time.perf_counter() - started)
        finished, self._done = self._done, []
        return finished

    def cancel(self, request_id: str) -> bool:
        """Drop a queued or running request without a result, freeing its KV row and adapter
        reference. Returns False when the engine does not hold it (finished or unknown)."""
        for seq in self._waiting:
            if seq.request.request_id == request_id:
                self._waiting.remove(seq)
                return True
        for seq in self._running:
            if seq.request.request_id == request_id:
                self._release(seq, clear=True)
                return True
        return False

    def output_so_far(self, request_id: str) -> list[int] | None:
        """The tokens a running request has generated so far; None when it is not running."""
        for seq in self._running:
            if seq.request.request_id == request_id:
                return seq.output_ids
        return None

    def has_work(self) -> bool:
        return bool(self._waiting or self._running or self._done)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    def run_until_complete(self) -> list[GenerationResult]:
        results: list[GenerationResult] = []
        while self.has_work():
            results.extend(self.step())
        return results

    def generate(self, requests: Iterable[GenerationRequest]) -> list[GenerationResult]:
        """Run requests to completion; results in the order of the requests."""
        order = [self.submit(request).request_id for request in requests]
        by_id = {result.request_id: result for result in self.run_until_complete()}
        return [by_id[request_id] for request_id in order]

    def close(self) -> None:
        """Stop the adapter loader threads."""
        if self._adapters is not None:
            self._adapters.close()

    # --- adapter residency -------------------------------------------------------------------

    def adapter_status(self, adapter_id: AdapterId) -> AdapterStatus:
        """Where the adapter is now; UNKNOWN when this engine serves the base model only."""
        if self._adapters is None:
            return AdapterStatus.UNKNOWN
        return self._adapters.status(adapter_id)

    def expect_adapters(self, adapter_ids: Iterable[AdapterId]) -> None:
        """The adapters of requests the caller will submit soon, most urgent first; replaces
        the previous list. Each step prefetches them after those of the engine's own queue, so
        they load while running sequences decode."""
        self._expected = list(adapter_ids)

    def encode(self, prompt: Prompt) -> list[int]:
        """A prompt's token ids by the checkpoint's own rules (a conversation through its chat
        template; NoChatTemplate when it has none)."""
        if self.codec is None:
            raise ValueError("this model directory has no tokenizer.json; pass token ids")
        return self.codec.encode(prompt)

    # --- validation --------------------------------------------------------------------------

    def _problem(
        self, request: GenerationRequest, sampling: SamplingParams
    ) -> tuple[ErrorCode, str] | None:
        if not is_valid_id(str(request.request_id)):
            return ErrorCode.INVALID_PARAMETERS, f"invalid request id {request.request_id!r}"
        if request.adapter_id is not None and self._adapters is None:
            return ErrorCode.UNKNOWN_ADAPTER, "this engine serves the base model only"
        sampling_problem = sampling.problem()
        if sampling_problem is not None:
            return ErrorCode.INVALID_PARAMETERS, sampling_problem
        if not isinstance(request.max_new_tokens, int) or request.max_new_tokens < 1:
            return ErrorCode.INVALID_PARAMETERS, "max_new_tokens must be an integer >= 1"
        vocab = self.model.config.vocab_size
        if not request.prompt_ids:
            return ErrorCode.INVALID_PARAMETERS, "the prompt is empty"
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in request.prompt_ids):
            return ErrorCode.INVALID_PARAMETERS, f"prompt token ids must lie in [0, {vocab})"
        if len(request.prompt_ids) >= self.max_seq_len:
            return (
                ErrorCode.PROMPT_TOO_LONG,
                f"the prompt has {len(request.prompt_ids)} tokens; the limit is "
                f"{self.max_seq_len - 1} (max_seq_len {self.max_seq_len} includes the completion)",
            )
        if request.stop_strings and self.codec is None:
            return ErrorCode.INVALID_PARAMETERS, "stop strings need a model with tokenizer.json"
        return None

    # --- scheduling --------------------------------------------------------------------------

    def _admit(self) -> None:
        blocked: deque[_Sequence] = deque()
        try:
            while self._waiting and self.cache.free_rows:
                seq = self._waiting.popleft()
                outcome = self._place(seq)
                if outcome == "run":
                    self._running.append(seq)
                elif outcome == "wait":
                    blocked.append(seq)
        finally:  # requests that must wait keep their place in the queue
            blocked.extend(self._waiting)
            self._waiting = blocked

    def _place(self, seq: _Sequence) -> Literal["run", "wait", "failed"]:
        """Give a waiting sequence its adapter slot and a KV row; "wait" leaves it queued,
        "failed" has queued its error result."""
        adapter_id = seq.request.adapter_id
        if adapter_id is not None and self._adapters is not None:
            started = time.perf_counter()
            try:
                # Never stall running sequences on a disk read: wait at the head of the queue,
                # whose adapters `_prefetch` loads in the background, and admit on a later
                # step. With nothing running, waiting is all there is to do.
                status = self._adapters.status(adapter_id)
                if self._running and status in (AdapterStatus.ON_DISK, AdapterStatus.LOADING):
                    return "wait"
                seq.acquired = self._adapters.acquire(adapter_id)
            except UnknownAdapter as exc:
                self._done.append(self._error_for(seq, ErrorCode.UNKNOWN_ADAPTER, exc.reason))
                return "failed"
            except AdapterRefused as exc:
                self._done.append(self._error_for(seq, ErrorCode.ADAPTER_REFUSED, exc.reason))
                return "failed"
            except NoFreeSlot as exc:
                if not self._running:  # nothing will free a slot: its class is all pinned
                    self._done.append(self._error_for(seq, ErrorCode.INTERNAL, str(exc)))
                    return "failed"
                return "wait"  # a slot frees up when a sequence finishes
            except Exception as exc:  # e.g. a disk error: fail this request only
                message = f"loading adapter {adapter_id!r} failed: {exc}"
                self._done.append(self._error_for(seq, ErrorCode.INTERNAL, message))
                return "failed"
            seq.adapter_load_s = time.perf_counter() - started
        seq.kv_row = self.cache.allocate()
        seq.admitted = time.perf_counter()
        return "run"

    def _prefetch(self) -> None:
        """The one place adapters are prefetched: those of the queue's head first (requests
        waiting for a disk read stand there), then those the caller expects to submit."""
        if self._adapters is None:
            return
        wanted = [
            seq.request.adapter_id
            for seq in islice(self._waiting, self.config.prefetch_depth)
            if seq.request.adapter_id is not None
        ] + self._expected
        if wanted:
            self._adapters.prefetch(wanted)

    def _forward_and_sample(self) -> None:
        chunks: list[SequenceChunk] = []
        sampled: list[_Sequence] = []
        prefill_budget = self.config.max_prefill_tokens
        prefill_tokens = decode_tokens = 0
        for seq in self._running:
            remaining = len(seq.tokens) - seq.num_cached
            if remaining > 1 and prefill_budget <= 0:
                continue  # this prompt continues next step
            take = remaining if remaining == 1 else min(remaining, prefill_budget)
            if remaining > 1:
                prefill_budget -= take
            completes = take == remaining
            if seq.num_cached >= seq.prompt_len:
                decode_tokens += take
            else:
                prefill_tokens += take
            pool, slot = (
                (seq.acquired.slot.pool_index, int(seq.acquired.slot.slot))
                if seq.acquired is not None
                else (-1, -1)
            )
            chunks.append(
                SequenceChunk(
                    kv_row=seq.kv_row,
                    start_position=seq.num_cached,
                    token_ids=seq.tokens[seq.num_cached : seq.num_cached + take],
                    logits="last" if completes else "none",
                    lora_pool=pool,
                    lora_slot=slot,
                )
            )
            seq.num_cached += take
            if completes:
                sampled.append(seq)
        batch = ForwardBatch.build(chunks, self.model.device)
        self.last_step = StepStats(
            prefill_tokens=prefill_tokens, decode_tokens=decode_tokens, sequences=len(chunks)
        )
        lora = (
            build_active_lora(
                self._adapters.pools,
                batch.token_pools,
                batch.token_slots,
                prefill=batch.has_prefill,
            )
            if self._adapters is not None
            else []
        )
        logits = self.model(batch, self.cache, lora)
        if not sampled:
            return
        logits, sampled = self._drop_non_finite(logits, sampled)
        if not sampled:
            return
        tokens = sample_tokens(
            logits, [s.sampling for s in sampled], [s.generator for s in sampled]
        )
        now = time.perf_counter()
        for seq, token in zip(sampled, tokens, strict=True):
            if seq.first_token_at is None:
                seq.first_token_at = now
            seq.tokens.append(token)
            self._check_finished(seq, token)

    def _drop_non_finite(
        self, logits: torch.Tensor, sampled: list[_Sequence]
    ) -> tuple[torch.Tensor, list[_Sequence]]:
        """Finish with an error every sequence whose logits hold a NaN or an infinity (a
        broken adapter, or an overflow): its output would be noise, and a sampler would
        return token 0 for it or fail the whole batch. The others go on."""
        finite = torch.isfinite(logits).all(dim=-1).tolist()
        if all(finite):
            return logits, sampled
        for seq, ok in zip(sampled, finite, strict=True):
            if not ok:
                adapter = seq.request.adapter_id
                self._finish_error(
                    seq,
                    ErrorCode.INTERNAL,
                    f"the model produced non-finite logits at output token {len(seq.output_ids)}"
                    + (f" with adapter {adapter!r}" if adapter is not None else ""),
                )
        keep = [i for i, ok in enumerate(finite) if ok]
        return logits[keep], [sampled[i] for i in keep]

    def _check_finished(self, seq: _Sequence, token: int) -> None:
        if token in seq.stop_ids:
            self._finish_ok(seq, "stop", drop_last=True)
        elif seq.request.stop_strings and self._hit_stop_string(seq):
            self._finish_ok(seq, "stop")
        elif len(seq.output_ids) >= seq.max_new_tokens:
            self._finish_ok(seq, "length")

    def _hit_stop_string(self, seq: _Sequence) -> bool:
        assert self.codec is not None  # checked at submit
        text = self.codec.decode(seq.output_ids)
        return any(stop in text for stop in seq.request.stop_strings)

    # --- results -----------------------------------------------------------------------------

    def _release(self, seq: _Sequence, *, clear: bool = False) -> None:
        """Free the sequence's KV row and adapter reference. `clear` zeroes the row first: a
        sequence that failed or was dropped may have left non-finite keys and values there
        (see `KVCache.clear`)."""
        if seq in self._running:
            self._running.remove(seq)
        if seq.kv_row >= 0:
            if clear:
                self.cache.clear(seq.kv_row)
            self.cache.free(seq.kv_row)
            seq.kv_row = -1
        adapter_id = seq.request.adapter_id
        if seq.acquired is not None and adapter_id is not None and self._adapters is not None:
            self._adapters.release(adapter_id)

    def _finish_ok(
        self, seq: _Sequence, reason: Literal["stop", "length"], drop_last: bool = False
    ) -> None:
        self._release(seq)
        now = time.perf_counter()
        output = seq.output_ids[:-1] if drop_last else seq.output_ids
        text = None
        if self.codec is not None:
            text = self.codec.decode(output)
            for stop in seq.request.stop_strings:
                text = text.split(stop, 1)[0]
        first = seq.first_token_at or now
        self._done.append(
            GenerationResult(
                request_id=seq.request.request_id,
                adapter_id=seq.request.adapter_id,
                status="ok",
                prompt_ids=list(seq.request.prompt_ids),
                output_ids=output,
                output_text=text,
                finish_reason=reason,
                usage=Usage(prompt_tokens=seq.prompt_len, completion_tokens=len(seq.output_ids)),
                timings=Timings(
                    queue_ms=_ms(seq.admitted - seq.submitted - seq.adapter_load_s),
                    adapter_load_ms=_ms(seq.adapter_load_s),
                    prefill_ms=_ms(first - seq.admitted),
                    decode_ms=_ms(now - first),
                    total_ms=_ms(now - seq.submitted),
                ),
                cache_tier=seq.acquired.tier if seq.acquired else CacheTier.NONE,
                adapter_version=seq.acquired.version if seq.acquired else None,
            )
        )

    def _finish_error(self, seq: _Sequence, code: ErrorCode, message: str) -> None:
        self._release(seq, clear=True)
        self._done.append(self._error_for(seq, code, message))

    def _error_for(self, seq: _Sequence, code: ErrorCode, message: str) -> GenerationResult:
        return self._error(seq.request, code, message, seq.submitted)

    def _error(
        self, request: GenerationRequest, code: ErrorCode, message: str, submitted: float
    ) -> GenerationResult:
        total = _ms(time.perf_counter() - submitted)
        prompt = list(request.prompt_ids) if isinstance(request.prompt_ids, Sequence) else []
        return GenerationResult(
            request_id=request.request_id,
            adapter_id=request.adapter_id,
            status="error",
            error_code=code,
            error_message=message.splitlines()[0][:1024] if message else code.value,
            prompt_ids=[t for t in prompt if isinstance(t, int)],
            timings=Timings(
                queue_ms=total, adapter_load_ms=0.0, prefill_ms=0.0, decode_ms=0.0, total_ms=total
            ),
        )


def _ms(seconds: float) -> float:
    return max(0.0, seconds * 1000.0)
