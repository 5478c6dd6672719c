"""OpenAI bodies to request events, without Kafka: what maps where, and the parameter a 400
names."""

from __future__ import annotations

import pytest

from pipeline.gateway.errors import ApiError
from pipeline.gateway.openai_requests import build_request, include_usage, parse_body
from pipeline.gateway.responses import Shapes
from pipeline.gateway.results import new_text
from schemas.events import InferenceResult, TokenDelta, Usage


def _request(body: dict):
    model, fields = parse_body("completions", body)
    return build_request("completions", model, body, fields)


def test_sampling_parameters_map_onto_the_request_event():
    request = _request({
        "model": "legal-eu", "prompt": ["the price is"], "max_tokens": 7, "temperature": 0.5,
        "top_p": 0.9, "seed": 4, "stop": "\n", "user": "client-1", "stream": True,
        "presence_penalty": 0,
    })
    assert (request.adapter_id, request.prompt, request.max_new_tokens) == (
        "legal-eu", "the price is", 7)
    assert (request.temperature, request.top_p, request.seed) == (0.5, 0.9, 4)
    assert (request.stop, request.client_id, request.stream) == (["\n"], "client-1", True)


@pytest.mark.parametrize(
    ("changes", "param"),
    [
        ({"model": None}, "model"),
        ({"prompt": 3}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"max_tokens": 1.5}, "max_tokens"),
        ({"max_tokens": 100_000}, "max_tokens"),
        ({"temperature": "hot"}, "temperature"),
        ({"seed": -1}, "seed"),
        ({"stop": ["a"] * 9}, "stop"),
        ({"user": "a b"}, "user"),
        ({"stream": "yes"}, "stream"),
        ({"logprobs": 2}, "logprobs"),
        ({"best_of": 2}, "best_of"),
    ],
)
def test_an_invalid_parameter_is_a_400_naming_it(changes, param):
    body = {"model": "legal-eu", "prompt": "p", **changes}
    with pytest.raises(ApiError) as raised:
        _request(body)
    assert (raised.value.status, raised.value.param) == (400, param)


def test_chat_messages_are_checked_before_the_event_is_built():
    for messages, param in [
        ([], "messages"),
        ([{"role": "robot", "content": "hi"}], "messages[0].role"),
        ([{"role": "user", "content": [{"type": "image_url"}]}], "messages[0].content"),
    ]:
        body = {"model": "a", "messages": messages}
        model, fields = parse_body("chat", body)
        with pytest.raises(ApiError) as raised:
            build_request("chat", model, body, fields)
        assert raised.value.param == param


def test_usage_in_a_stream_only_when_asked_for():
    assert include_usage({"stream_options": {"include_usage": True}})
    assert not include_usage({})


def test_chunks_and_completions_carry_the_request_id():
    result = InferenceResult(request_id="r1", adapter_id="a", status="ok", output_text="hi",
                             finish_reason="stop", worker_id="w",
                             usage=Usage(prompt_tokens=3, completion_tokens=1))
    chat = Shapes("chat", "r1", "a", 0)
    assert chat.completion(result)["choices"][0]["message"] == {
        "role": "assistant", "content": "hi"}
    assert chat.completion(result)["usage"]["total_tokens"] == 4
    assert chat.chunk("", first=True)["choices"][0]["delta"] == {"role": "assistant",
                                                                  "content": ""}
    text = Shapes("completions", "r1", "a", 0)
    assert text.completion(result)["id"] == "cmpl-r1"
    assert text.chunk(None, "length")["choices"][0] == {
        "index": 0, "text": "", "logprobs": None, "finish_reason": "length"}


def test_repeated_and_out_of_place_deltas_add_nothing():
    def delta(offset: int, text: str) -> TokenDelta:
        return TokenDelta(request_id="r1", offset=offset, text=text)

    assert new_text("", delta(0, "the")) == "the"
    assert new_text("the", delta(3, " price")) == " price"
    assert new_text("the price", delta(0, "the pr")) == ""  # a repeat
    assert new_text("the price", delta(4, "price is")) == " is"  # a repeat that goes further
    assert new_text("the", delta(9, " is")) == ""  # past a gap
    assert new_text("the price", delta(4, "prize")) == ""  # not this text
