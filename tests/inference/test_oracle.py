"""The correctness oracle: one mixed batch through the engine equals, row by row, transformers +
peft with that row's adapter alone (float32), and greedy generations are identical."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from multi_lora_fixtures import (
    AdapterRecipe,
    peft_model,
    reference_greedy,
    reference_logits,
    save_peft_adapter_with_peft,
    save_tiny_llama,
)

from inference.adapter_cache import AdapterCache
from inference.adapter_store import AdapterStore
from inference.config import LoraServingConfig
from inference.engine import Engine, EngineConfig, GenerationRequest
from inference.lora_layers import build_active_lora
from inference.model import ForwardBatch, SequenceChunk, load_model
from kernels.dispatch import Backend, use_backend

RECIPES = [
    AdapterRecipe("r8-all", r=8, lora_alpha=16, seed=1),
    AdapterRecipe("r16-qv", r=16, lora_alpha=8, target_modules=["q_proj", "v_proj"], seed=2),
    AdapterRecipe("r32-rslora", r=32, lora_alpha=4, use_rslora=True, seed=3),
    AdapterRecipe(
        "r4-patterns",
        r=4,
        lora_alpha=2,
        target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
        rank_pattern={"o_proj": 12},
        alpha_pattern={"o_proj": 3.0, "down_proj": 7.0},
        seed=4,
    ),
]
ATOL = 2e-5


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("oracle")
    model_dir = save_tiny_llama(root / "base")
    store = root / "adapters"
    for recipe in RECIPES:
        save_peft_adapter_with_peft(model_dir, store, recipe)
    return model_dir, store


def _cache(store: Path, model_config, fuse: bool | None = None) -> AdapterCache:
    serving = LoraServingConfig(slots_per_class=(2, 2, 2, 1), fuse_projections=fuse)
    return AdapterCache(AdapterStore(store), model_config, serving)


def _prompts() -> list[list[int]]:
    generator = torch.Generator().manual_seed(7)
    lengths = [9, 5, 12, 7, 6]
    return [torch.randint(0, 256, (n,), generator=generator).tolist() for n in lengths]


# Fused: one kernel call per q|k|v and gate|up layer; unfused: one per projection. "triton"
# runs the GPU kernels under Triton's interpreter on the CPU tensors.
@pytest.mark.parametrize(
    ("fuse", "backend"), [(True, "torch"), (False, "torch"), (True, "triton"), (False, "triton")]
)
def test_mixed_batch_logits_match_peft_row_by_row(
    world: tuple[Path, Path], fuse: bool, backend: Backend
) -> None:
    model_dir, store = world
    model = load_model(model_dir)
    adapters = _cache(store, model.config, fuse)
    cache = model.new_cache(8, 64)
    adapter_ids: list[str | None] = [r.adapter_id for r in RECIPES] + [None]
    prompts = _prompts()
    slots = [adapters.acquire(a).slot if a else None for a in adapter_ids]
    rows = [cache.allocate() for _ in prompts]
    # Different ranks land in different pools: the batch really spans several of them.
    assert len({s.pool_index for s in slots if s is not None}) >= 3

    def chunk(i: int, start: int, tokens: list[int], logits: str) -> SequenceChunk:
        slot = slots[i]
        return SequenceChunk(
            kv_row=rows[i],
            start_position=start,
            token_ids=tokens,
            logits=logits,  # type: ignore[arg-type]
            lora_pool=slot.pool_index if slot else -1,
            lora_slot=int(slot.slot) if slot else -1,
        )

    def run(chunks: list[SequenceChunk]) -> torch.Tensor:
        batch = ForwardBatch.build(chunks, "cpu")
        lora = build_active_lora(
            adapters.pools, batch.token_pools, batch.token_slots, prefill=batch.has_prefill
        )
        with use_backend(backend):
            return model(batch, cache, lora)

    # Pass 1: every prompt but the last token of row 0, all positions' logits.
    prefix0 = prompts[0][:-1]
    first = run(
        [chunk(0, 0, prefix0, "all")]
        + [chunk(i, 0, p, "all") for i, p in enumerate(prompts) if i > 0]
    )
    # Pass 2: a decode token for rows 1.. and the last prompt token of row 0 together.
    extra = [3, 17, 101, 250]
    second = run(
        [chunk(0, len(prefix0), prompts[0][-1:], "last")]
        + [chunk(i, len(prompts[i]), [extra[i - 1]], "last") for i in range(1, len(prompts))]
    )

    offset = 0
    for i, adapter_id in enumerate(adapter_ids):
        reference_model = peft_model(model_dir, store / adapter_id if adapter_id else None)
        full = prompts[i] if i == 0 else prompts[i] + [extra[i - 1]]
        expected = reference_logits(reference_model, full)
        n = len(prefix0) if i == 0 else len(prompts[i])
        torch.testing.assert_close(first[offset : offset + n], expected[:n], atol=ATOL, rtol=0)
        torch.testing.assert_close(second[i], expected[-1], atol=ATOL, rtol=0)
        offset += n
    # The adapters change the output: a comparison with the bare base would fail.
    base = reference_logits(peft_model(model_dir, None), prompts[0])
    assert (first[: len(prefix0)] - base[: len(prefix0)]).abs().max() > 1e-2


def test_greedy_generations_match_peft(world: tuple[Path, Path]) -> None:
    model_dir, store = world
    model = load_model(model_dir)
    engine = Engine(
        model,
        _cache(store, model.config),
        EngineConfig(max_batch_size=8, max_seq_len=64, max_prefill_tokens=16),
    )
    adapter_ids: list[str | None] = [r.adapter_id for r in RECIPES] + [None]
    prompts = _prompts()
    new_tokens = 6
    requests = [
        GenerationRequest(prompt, adapter_id=a, max_new_tokens=new_tokens, stop_token_ids=[])
        for prompt, a in zip(prompts, adapter_ids, strict=True)
    ]
    # A small prefill budget splits prompts into chunks that share passes with decode tokens.
    results = engine.generate(requests)
    for result, prompt, adapter_id in zip(results, prompts, adapter_ids, strict=True):
        assert result.status == "ok", result.error_message
        reference_model = peft_model(model_dir, store / adapter_id if adapter_id else None)
        assert result.output_ids == reference_greedy(reference_model, prompt, new_tokens)
        assert result.finish_reason == "length"


def test_bfloat16_serving_stays_near_the_float32_reference(world: tuple[Path, Path]) -> None:
    model_dir, store = world
    model = load_model(model_dir, dtype=torch.bfloat16)
    adapters = AdapterCache(
        AdapterStore(store),
        model.config,
        LoraServingConfig(slots_per_class=(2, 2, 2, 1)),
        dtype=torch.bfloat16,
    )
    slot = adapters.acquire("r32-rslora").slot
    assert adapters.pools[slot.pool_index].params[0]["qkv_proj"][0].a.dtype == torch.bfloat16
    tokens = _prompts()[2]
    cache = model.new_cache(1, 32)
    chunk = SequenceChunk(
        cache.allocate(),
        0,
        tokens,
        logits="all",
        lora_pool=slot.pool_index,
        lora_slot=int(slot.slot),
    )
    batch = ForwardBatch.build([chunk], "cpu")
    served = model(
        batch,
        cache,
        build_active_lora(adapters.pools, batch.token_pools, batch.token_slots, prefill=True),
    )
    expected = reference_logits(peft_model(model_dir, store / "r32-rslora"), tokens)
    base = reference_logits(peft_model(model_dir, None), tokens)
    tolerance = 0.08  # bfloat16 keeps about three significant digits
    assert (served - expected).abs().max() < tolerance
    assert (expected - base).abs().max() > 4 * tolerance  # so a dropped adapter would show
