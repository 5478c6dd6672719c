"""The engine: continuous batching, sampling, stops, limits, timings, and errors that come back
as results instead of exceptions."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import torch
from adapter_manifests import write_manifest
from multi_lora_fixtures import save_tiny_llama
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace

from inference.adapter_cache import AdapterCache, AdapterStatus
from inference.adapter_store import AdapterStore
from inference.adapters import save_peft_adapter
from inference.config import LORA_TARGETS, LoraServingConfig
from inference.engine import Engine, EngineConfig, GenerationRequest, GenerationResult
from inference.model import load_model
from inference.sampling import SamplingParams, sample_tokens
from schemas.events import CacheTier, ErrorCode

WORDS = ["[UNK]", "the", "cat", "sat", "on", "a", "mat"]


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("engine")
    model_dir = save_tiny_llama(root / "base")
    # Every id decodes to a word: w7 ... w255 after the few real ones.
    vocab = {word: i for i, word in enumerate(WORDS)}
    vocab.update({f"w{i}": i for i in range(len(WORDS), 256)})
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = Whitespace()
    tokenizer.save(str(model_dir / "tokenizer.json"))
    store = root / "adapters"
    generator = torch.Generator().manual_seed(0)
    for adapter_id, rank in [("ad-8", 8), ("ad-16", 16), ("ad-8b", 8), ("ad-8c", 8)]:
        modules = {}
        for layer in range(2):
            for target in LORA_TARGETS:
                i, o = {
                    "q_proj": (64, 64),
                    "k_proj": (64, 32),
                    "v_proj": (64, 32),
                    "o_proj": (64, 64),
                    "gate_proj": (64, 128),
                    "up_proj": (64, 128),
                    "down_proj": (128, 64),
                }[target]
                modules[(layer, target)] = (
                    torch.randn(rank, i, generator=generator) * 0.3,
                    torch.randn(o, rank, generator=generator) * 0.3,
                )
        save_peft_adapter(store / adapter_id, modules, lora_alpha=2 * rank)
    # A copy of ad-8 whose manifest does not match its weights.
    broken = store / "broken"
    broken.mkdir()
    for path in (store / "ad-8").iterdir():
        (broken / path.name).write_bytes(path.read_bytes())
    write_manifest(broken, weights_hash="0" * 64)
    return model_dir, store


def _engine_and_cache(
    world: tuple[Path, Path], slots=(4, 2, 1, 1), **config
) -> tuple[Engine, AdapterCache]:
    """An engine and its adapter cache, which the engine keeps private: tests look inside."""
    model_dir, store = world
    model = load_model(model_dir)
    cache = AdapterCache(
        AdapterStore(store), model.config, LoraServingConfig(slots_per_class=slots)
    )
    settings = {"max_batch_size": 4, "max_seq_len": 48, "max_prefill_tokens": 64, **config}
    return Engine(model, cache, EngineConfig(**settings)), cache


def _engine(world: tuple[Path, Path], slots=(4, 2, 1, 1), **config) -> Engine:
    return _engine_and_cache(world, slots, **config)[0]


def _prompt(n: int, seed: int) -> list[int]:
    return torch.randint(3, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _request(prompt: list[int], **kwargs) -> GenerationRequest:
    return GenerationRequest(prompt, stop_token_ids=kwargs.pop("stop_token_ids", []), **kwargs)


def _alone(world, request: GenerationRequest) -> GenerationResult:
    (result,) = _engine(world).generate([request])
    return result


def test_sequences_join_and_leave_without_changing_each_other(world) -> None:
    engine = _engine(world, max_prefill_tokens=8)
    requests = [
        _request(_prompt(10, 1), adapter_id="ad-8", max_new_tokens=12),
        _request(_prompt(6, 2), adapter_id="ad-16", max_new_tokens=3),
        _request(_prompt(13, 3), adapter_id=None, max_new_tokens=5),
        _request(_prompt(4, 4), adapter_id="ad-8b", max_new_tokens=7),
        _request(_prompt(9, 5), adapter_id="ad-16", max_new_tokens=4),
    ]
    engine.submit(requests[0])
    results = engine.step() + engine.step()
    for request in requests[1:]:  # arrive while the first decodes
        engine.submit(request)
        results += engine.step()
    assert engine.num_running + engine.num_waiting > 0
    results += engine.run_until_complete()
    by_id = {r.request_id: r for r in results}
    assert len(by_id) == len(requests)
    for request in requests:
        result = by_id[request.request_id]
        assert result.status == "ok", result.error_message
        assert len(result.output_ids) == request.max_new_tokens
        assert result.output_ids == _alone(world, request).output_ids


def test_the_same_seed_gives_the_same_sample_whatever_the_batch(world) -> None:
    prompt = _prompt(8, 6)
    sampled = dict(temperature=1.3, top_p=0.95, max_new_tokens=10, adapter_id="ad-8")
    alone = _alone(world, _request(prompt, seed=42, **sampled))
    crowd = _engine(world).generate(
        [
            _request(_prompt(5, 7), adapter_id="ad-16", max_new_tokens=4),
            _request(prompt, seed=42, **sampled),
            _request(prompt, seed=43, **sampled),
        ]
    )
    assert crowd[1].output_ids == alone.output_ids
    assert crowd[2].output_ids != alone.output_ids  # 10 draws at temperature 1.3 differ
    greedy = _alone(world, _request(prompt, adapter_id="ad-8", max_new_tokens=10))
    assert alone.output_ids != greedy.output_ids


def test_stop_tokens_end_generation(world) -> None:
    prompt = _prompt(7, 8)
    free = _alone(world, _request(prompt, adapter_id="ad-8", max_new_tokens=8))
    stop = free.output_ids[2]
    first = free.output_ids.index(stop)
    stopped = _alone(
        world, _request(prompt, adapter_id="ad-8", max_new_tokens=8, stop_token_ids=[stop])
    )
    assert stopped.finish_reason == "stop"
    assert stopped.output_ids == free.output_ids[:first]
    assert stopped.usage.completion_tokens == first + 1  # the stop token was generated
    assert stopped.usage.prompt_tokens == len(prompt)
    assert free.finish_reason == "length" and free.usage.completion_tokens == 8


def test_model_eos_is_the_default_stop(world, tmp_path: Path) -> None:
    model_dir, store = world
    prompt = _prompt(5, 9)
    free = _alone(world, _request(prompt, max_new_tokens=8))
    eos = free.output_ids[3]
    # The same checkpoint, declaring that token its end of sequence.
    copy = tmp_path / "eos-model"
    copy.mkdir()
    for path in model_dir.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "eos_token_id": eos}))
    engine = Engine.from_model_dir(copy, store, config=EngineConfig(max_seq_len=48))
    (result,) = engine.generate([GenerationRequest(prompt, max_new_tokens=8)])
    assert result.finish_reason == "stop"
    assert result.output_ids == free.output_ids[: free.output_ids.index(eos)]


def test_completion_is_capped_by_the_cache_length(world) -> None:
    (result,) = _engine(world, max_seq_len=16).generate(
        [_request(_prompt(10, 10), max_new_tokens=50)]
    )
    assert result.status == "ok" and result.finish_reason == "length"
    assert len(result.output_ids) == 6


def test_timings_usage_and_cache_tier(world) -> None:
    engine, cache = _engine_and_cache(world)
    first, second = engine.generate(
        [
            _request(_prompt(6, 11), adapter_id="ad-16", max_new_tokens=3),
            _request(_prompt(6, 12), adapter_id="ad-16", max_new_tokens=3),
        ]
    )
    assert first.cache_tier == CacheTier.DISK and second.cache_tier == CacheTier.DEVICE
    (third,) = engine.generate([_request(_prompt(6, 13), max_new_tokens=2)])
    assert third.cache_tier == CacheTier.NONE and third.adapter_version is None
    assert first.adapter_version == second.adapter_version and len(first.adapter_version) == 64
    for result in (first, second, third):
        t = result.timings
        assert t is not None
        assert min(t.queue_ms, t.adapter_load_ms, t.prefill_ms, t.decode_ms) >= 0
        assert t.total_ms >= t.prefill_ms + t.decode_ms
    assert first.timings.adapter_load_ms > 0
    assert cache.refcount("ad-16") == 0  # released when they finished


@pytest.mark.parametrize(
    ("change", "code", "message"),
    [
        ({"adapter_id": "missing"}, ErrorCode.UNKNOWN_ADAPTER, "no adapter 'missing'"),
        # Ids are validated where they enter (schemas.ids.AdapterId); one that slipped past
        # could still not leave the adapter store.
        ({"adapter_id": "../up"}, ErrorCode.UNKNOWN_ADAPTER, r"no adapter '\.\./up'"),
        ({"adapter_id": "broken"}, ErrorCode.ADAPTER_REFUSED, "weights were changed"),
        ({"prompt_ids": list(range(48))}, ErrorCode.PROMPT_TOO_LONG, "the limit is 47"),
        ({"prompt_ids": []}, ErrorCode.INVALID_PARAMETERS, "the prompt is empty"),
        ({"prompt_ids": [5, 300]}, ErrorCode.INVALID_PARAMETERS, r"lie in \[0, 256\)"),
        ({"temperature": -1.0}, ErrorCode.INVALID_PARAMETERS, "temperature must be"),
        ({"temperature": float("nan")}, ErrorCode.INVALID_PARAMETERS, "temperature must be"),
        ({"top_p": 0.0}, ErrorCode.INVALID_PARAMETERS, "top_p must lie"),
        ({"max_new_tokens": 0}, ErrorCode.INVALID_PARAMETERS, "max_new_tokens"),
        ({"seed": -3}, ErrorCode.INVALID_PARAMETERS, "seed must lie"),
        ({"request_id": "a/b"}, ErrorCode.INVALID_PARAMETERS, "invalid request id"),
    ],
)
def test_bad_requests_come_back_as_error_results(
    world, change: dict, code: ErrorCode, message: str
) -> None:
    engine = _engine(world)
    good = _request(_prompt(5, 14), adapter_id="ad-8", max_new_tokens=3)
    fields = {"prompt_ids": _prompt(5, 15), "max_new_tokens": 3, "stop_token_ids": [], **change}
    bad = GenerationRequest(**fields)
    results = {r.request_id: r for r in engine.generate([bad, good])}
    assert results[good.request_id].status == "ok"
    failed = results[bad.request_id]
    assert failed.status == "error" and failed.error_code == code
    assert failed.output_ids == [] and failed.usage.completion_tokens == 0
    assert failed.timings is not None and "\n" not in failed.error_message
    assert re.search(message, failed.error_message), failed.error_message


def test_a_failing_forward_pass_fails_its_requests_not_the_loop(world, monkeypatch) -> None:
    engine, cache = _engine_and_cache(world)
    engine.submit(_request(_prompt(5, 16), adapter_id="ad-8", max_new_tokens=3))

    def explode(*args, **kwargs):
        raise RuntimeError("device lost")

    monkeypatch.setattr(engine.model, "forward", explode)
    (result,) = engine.step()
    assert result.error_code == ErrorCode.INTERNAL and "device lost" in result.error_message
    assert cache.refcount("ad-8") == 0 and engine.cache.free_rows == 4
    monkeypatch.undo()
    (ok,) = engine.generate([_request(_prompt(5, 16), adapter_id="ad-8", max_new_tokens=3)])
    assert ok.status == "ok"


def test_requests_wait_for_a_device_slot(world) -> None:
    engine = _engine(world, slots=(1, 1, 1, 1))
    requests = [
        _request(_prompt(5, 17 + i), adapter_id=a, max_new_tokens=3)
        for i, a in enumerate(["ad-8", "ad-8b", "ad-8c", "ad-8"])
    ]
    engine.submit(requests[0])
    engine.step()  # ad-8 holds the only rank-8 slot
    for request in requests[1:]:
        engine.submit(request)
    engine.step()
    assert engine.num_waiting >= 1  # ad-8b and ad-8c need the slot ad-8 holds
    by_id = {r.request_id: r for r in engine.run_until_complete()}
    assert len(by_id) == len(requests)
    for request in requests:
        result = by_id[request.request_id]
        assert result.status == "ok", result.error_message
        assert result.output_ids == _alone(world, request).output_ids


def test_chunked_prefill_gives_the_same_tokens(world) -> None:
    request = _request(_prompt(30, 21), adapter_id="ad-16", max_new_tokens=6)
    whole = _engine(world).generate([request])[0]
    chunked = _engine(world, max_prefill_tokens=7).generate([request])[0]
    assert chunked.output_ids == whole.output_ids


def test_text_prompts_and_stop_strings(world) -> None:
    model_dir, store = world
    engine = Engine.from_model_dir(model_dir, store, config=EngineConfig(max_seq_len=48))
    assert engine.codec is not None and engine.base_hash is not None
    prompt = engine.encode("the cat sat on a mat")
    assert prompt == [1, 2, 3, 4, 5, 6]
    free = engine.generate([_request(prompt, max_new_tokens=6, adapter_id="ad-8")])[0]
    words = free.output_text.split()
    assert len(words) == 6 and free.output_text == engine.codec.decode(free.output_ids)
    stop_word = words[2]
    stopped = engine.generate(
        [_request(prompt, max_new_tokens=6, adapter_id="ad-8", stop_strings=[stop_word])]
    )[0]
    assert stopped.finish_reason == "stop"
    assert stopped.output_text.split() == words[: words.index(stop_word)]
    without = _engine(world)  # no tokenizer attached
    (refused,) = without.generate([_request(prompt, stop_strings=["x"])])
    assert refused.error_code == ErrorCode.INVALID_PARAMETERS


def test_top_p_keeps_only_the_nucleus() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    params = SamplingParams(temperature=1.0, top_p=0.7, seed=0)
    generator = params.new_generator()
    draws = {sample_tokens(logits, [params], [generator])[0] for _ in range(200)}
    assert draws == {0, 1}
    greedy = SamplingParams()
    assert sample_tokens(logits, [greedy], [greedy.new_generator()]) == [0]


def test_adapters_of_queued_requests_load_while_others_decode(world) -> None:
    engine = _engine(world)
    running = _request(_prompt(6, 22), adapter_id="ad-8", max_new_tokens=20)
    queued = _request(_prompt(6, 23), adapter_id="ad-16", max_new_tokens=3)
    engine.submit(running)
    engine.step()
    engine.submit(queued)
    engine.step()  # the disk read starts in the background; the running sequence decodes on
    assert engine.num_waiting == 1 and engine.num_running == 1
    deadline = time.monotonic() + 10
    while engine.adapter_status("ad-16") == AdapterStatus.LOADING:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    results = {r.request_id: r for r in engine.run_until_complete()}
    assert results[queued.request_id].cache_tier in (CacheTier.HOST, CacheTier.DEVICE)
    assert results[running.request_id].output_ids == _alone(world, running).output_ids


def test_cancelled_requests_free_their_row_and_adapter(world) -> None:
    engine, cache = _engine_and_cache(world)
    running = _request(_prompt(6, 24), adapter_id="ad-8", max_new_tokens=10)
    queued = _request(_prompt(6, 25), adapter_id="ad-16", max_new_tokens=10)
    kept = _request(_prompt(6, 26), adapter_id="ad-8b", max_new_tokens=4)
    engine.submit(running)
    engine.step()
    engine.submit(queued)
    engine.submit(kept)
    assert engine.cancel(running.request_id) and engine.cancel(queued.request_id)
    assert not engine.cancel(running.request_id) and not engine.cancel("never-submitted")
    assert cache.refcount("ad-8") == 0 and engine.cache.free_rows == 4
    results = engine.run_until_complete()
    assert [r.request_id for r in results] == [kept.request_id]
    assert results[0].output_ids == _alone(world, kept).output_ids


def test_expected_adapters_load_while_others_decode_and_evict_nothing_in_use(world) -> None:
    engine = _engine(world, slots=(1, 1, 1, 1))
    running = _request(_prompt(6, 27), adapter_id="ad-8", max_new_tokens=12)
    engine.submit(running)
    engine.step()  # ad-8 takes the only rank-8 slot
    assert engine.adapter_status("ad-8b") == AdapterStatus.ON_DISK
    engine.expect_adapters(["ad-8b", "ad-16"])  # not submitted: a scheduler still holds them
    engine.step()  # the disk reads start in the background
    deadline = time.monotonic() + 10
    while AdapterStatus.LOADING in {engine.adapter_status(a) for a in ("ad-8b", "ad-16")}:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    engine.step()  # uploads go to free slots only
    assert engine.num_running == 1 and engine.num_waiting == 0
    assert engine.adapter_status("ad-8") == AdapterStatus.ON_DEVICE
    assert engine.adapter_status("ad-8b") == AdapterStatus.IN_HOST
    assert engine.adapter_status("ad-16") == AdapterStatus.ON_DEVICE
    (result,) = engine.run_until_complete()
    assert result.output_ids == _alone(world, running).output_ids


def test_an_engine_without_adapters_knows_none(world) -> None:
    model_dir, _ = world
    engine = Engine(load_model(model_dir), None, EngineConfig(max_seq_len=48))
    assert engine.adapter_status("ad-8") == AdapterStatus.UNKNOWN
    engine.expect_adapters(["ad-8"])  # nothing to prefetch into
    (refused,) = engine.generate([_request(_prompt(5, 28), adapter_id="ad-8")])
    assert refused.error_code == ErrorCode.UNKNOWN_ADAPTER
