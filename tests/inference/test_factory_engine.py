"""An adapter trained by ModelFactory and served by the engine gives the logits of the model it
was trained as: transformers' Llama with peft's LoRA, with the saved (bit-exact float32)
weights."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import PeftModel

from inference.adapter_cache import AdapterCache
from inference.adapter_store import AdapterStore
from inference.base_model import load_base_model
from inference.config import LoraServingConfig
from inference.lora_layers import build_active_lora
from inference.model import ForwardBatch, SequenceChunk, load_model


def test_engine_reproduces_the_training_time_logits(
    trained_adapter, base_model_dir: Path, small_datanet
) -> None:
    torch.set_num_threads(1)
    fact = small_datanet.synthetic.facts[0]
    base, tokenizer = load_base_model(base_model_dir)
    tokens = [tokenizer.bos_token_id, *tokenizer(fact.text, add_special_tokens=False)["input_ids"]]
    trained = PeftModel.from_pretrained(base, str(trained_adapter.adapter_dir)).eval()
    with torch.no_grad():
        expected = trained(torch.tensor([tokens])).logits[0].float()
        with trained.disable_adapter():
            untuned = trained(torch.tensor([tokens])).logits[0].float()

    model = load_model(base_model_dir)
    adapters = AdapterCache(
        AdapterStore(trained_adapter.adapter_dir.parent), model.config, LoraServingConfig()
    )
    slot = adapters.acquire("commons-a").slot
    cache = model.new_cache(1, 64)
    chunk = SequenceChunk(
        kv_row=cache.allocate(),
        start_position=0,
        token_ids=tokens,
        logits="all",
        lora_pool=slot.pool_index,
        lora_slot=int(slot.slot),
    )
    batch = ForwardBatch.build([chunk], "cpu")
    lora = build_active_lora(
        adapters.pools, batch.token_pools, batch.token_slots, prefill=batch.has_prefill
    )
    with torch.no_grad():
        served = model(batch, cache, lora)
    torch.testing.assert_close(served, expected, atol=2e-5, rtol=0)
    assert (served - untuned).abs().max() > 1e-2  # the adapter matters
