"""Token deltas of streaming requests: only settled text goes out, and a request's deltas, in
order, concatenate to its result's text (stop strings cut off, as the result cuts them)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from random_adapters import write_random_adapters

from inference.base_model import build_base_model
from inference.config import ModelConfig
from inference.worker.backend import BackendConfig, ServingBackend
from inference.worker.sketching import SketchMode, SketchPolicy
from inference.worker.token_stream import TokenStream, settled_text
from infra.settings import load_settings
from schemas.events import InferenceRequest


def test_text_that_may_begin_a_stop_string_is_held_back():
    assert settled_text("the price is 4", ()) == "the price is 4"
    assert settled_text("the price is 4", ["END"]) == "the price is"
    assert settled_text("the price isEND and more", ["END"]) == "the price is"
    assert settled_text("price \ufffd", ()) == "price "


def test_a_stream_sends_only_growth_in_order():
    stream = TokenStream("r1")
    for text in ["the", "the", "the pri", "the price", "th"]:
        stream.advance(text)
    deltas = stream.take()
    assert [(d.offset, d.text) for d in deltas] == [(0, "the"), (3, " pri"), (7, "ce")]
    assert stream.take() == []


@pytest.fixture(scope="module")
def backend(tmp_path_factory) -> ServingBackend:
    root = tmp_path_factory.mktemp("stream")
    base = root / "base-model"
    build_base_model(base, load_settings().cache_dir, "test")
    write_random_adapters(root / "adapters", ["s0", "s1"], ModelConfig.from_model_dir(base))
    torch.set_num_threads(1)
    serving = ServingBackend.build(
        base, Path(root / "adapters"), worker_id="w-test",
        config=BackendConfig(max_batch=4, max_seq_len=128),
        sketch_policy=SketchPolicy(SketchMode.OFF),
    )
    yield serving
    serving.close()


def test_streaming_requests_get_deltas_that_add_up_to_their_result(backend):
    requests = [
        InferenceRequest(adapter_id=f"s{i % 2}", prompt=f"the price of item {i} is",
                         max_new_tokens=20, temperature=0.9, seed=i, stream=True,
                         stop=[" the"] if i % 2 else [])
        for i in range(4)
    ]
    quiet = InferenceRequest(adapter_id="s0", prompt="the price of salt is", max_new_tokens=8)
    for request in [*requests, quiet]:
        backend.enqueue(request)
    deltas = []
    results = {}
    while not backend.idle():
        results.update({c.result.request_id: c.result for c in backend.advance()})
        deltas.extend(backend.take_deltas())
    assert quiet.request_id not in {d.request_id for d in deltas}
    for request in requests:
        result = results[request.request_id]
        mine = [d for d in deltas if d.request_id == request.request_id]
        assert [d.offset for d in mine] == [len("".join(d.text for d in mine[:i]))
                                            for i in range(len(mine))]
        assert "".join(d.text for d in mine) == result.output_text
    assert sum(len([d for d in deltas if d.request_id == r.request_id]) > 1
               for r in requests) >= 2, "deltas were not sent as the text was generated"
