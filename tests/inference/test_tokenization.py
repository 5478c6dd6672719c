"""Prompts become token ids by the checkpoint's own rules (transformers' tokenizer is the
reference), conversations through its chat template, on the tiny test base model."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from random_adapters import write_random_adapter
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import AutoTokenizer

from inference.config import ModelConfig
from inference.sketch import IGNORE, encode_pair
from inference.tokenizer import (
    NoChatTemplate,
    added_prefix_length,
    encode_prompt,
    encode_prompts,
    load_tokenizer,
)
from inference.worker.backend import BackendConfig, ServingBackend
from inference.worker.sketching import SketchMode, SketchPolicy
from schemas.events import ChatMessage, ErrorCode, InferenceRequest

TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant:{% endif %}"
)
CHAT = [
    ChatMessage(role="system", content="Answer briefly."),
    ChatMessage(role="user", content="What is the seed tax of Orvane?"),
]
TEXTS = ["the price of item 3 is", "", "  two spaces and a </s> inside", "Ünïcödé ✓"]


@pytest.fixture(scope="module")
def chat_model_dir(base_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny base model with a chat template added to its tokenizer."""
    directory = tmp_path_factory.mktemp("chat") / "base-model"
    shutil.copytree(base_model_dir, directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(directory)
    return directory


def test_text_prompts_encode_as_transformers_encodes_them(base_model_dir: Path) -> None:
    ours = load_tokenizer(base_model_dir)
    reference = AutoTokenizer.from_pretrained(base_model_dir)
    expected = [reference(text)["input_ids"] for text in TEXTS]
    assert encode_prompts(ours, TEXTS) == expected
    assert [encode_prompt(ours, text) for text in TEXTS] == expected
    # The tiny model's tokenizer declares its BOS in its own rules, and only once.
    assert all(ids[0] == ours.bos_token_id for ids in expected)
    assert encode_prompt(ours, "") == [ours.bos_token_id]
    assert added_prefix_length(ours) == 1


def test_a_tokenizer_without_bos_rules_gets_no_bos(tmp_path: Path) -> None:
    tokenizer = Tokenizer(WordLevel({"<s>": 0, "</s>": 1, "a": 2, "b": 3}, unk_token="a"))
    tokenizer.pre_tokenizer = Whitespace()
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    loaded = load_tokenizer(tmp_path)
    assert encode_prompt(loaded, "b a b") == [3, 2, 3]
    assert added_prefix_length(loaded) == 0


def test_conversations_render_with_the_chat_template(chat_model_dir: Path) -> None:
    ours = load_tokenizer(chat_model_dir)
    reference = AutoTokenizer.from_pretrained(chat_model_dir)
    dicts = [message.model_dump() for message in CHAT]
    expected = reference.apply_chat_template(
        dicts, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert encode_prompt(ours, CHAT) == expected
    rendered = reference.apply_chat_template(dicts, add_generation_prompt=True, tokenize=False)
    assert rendered.endswith("<s>assistant:")
    assert expected.count(ours.bos_token_id) == 3  # written by the template, not added
    texts_and_chats = encode_prompts(ours, ["hello", CHAT, "bye"])
    assert texts_and_chats == [encode_prompt(ours, "hello"), expected, encode_prompt(ours, "bye")]


def test_a_checkpoint_without_a_chat_template_refuses_conversations(base_model_dir: Path) -> None:
    with pytest.raises(NoChatTemplate, match="no chat template"):
        encode_prompt(load_tokenizer(base_model_dir), CHAT)


def test_sketch_pairs_take_the_prompt_as_the_checkpoint_encodes_it(chat_model_dir: Path) -> None:
    tokenizer = load_tokenizer(chat_model_dir)
    completion = tokenizer(" 17 copper.", add_special_tokens=False)["input_ids"]
    chat = encode_pair(tokenizer, CHAT, " 17 copper.", 256)
    assert chat.input_ids == encode_prompt(tokenizer, CHAT) + completion
    assert chat.labels == [IGNORE] * (len(chat.input_ids) - len(completion)) + completion
    # Truncation keeps the BOS the tokenizer adds to a text, then the prompt's last tokens.
    text = encode_pair(tokenizer, "a long prompt about the valley of Orvane", " 17 copper.", 8)
    assert text.input_ids[0] == tokenizer.bos_token_id and len(text.input_ids) == 8
    assert text.input_ids[-len(completion) :] == completion


def _backend(model_dir: Path, adapters_dir: Path) -> ServingBackend:
    torch.set_num_threads(1)
    return ServingBackend.build(
        model_dir, adapters_dir, worker_id="w-test",
        config=BackendConfig(max_batch=4, max_seq_len=128),
        sketch_policy=SketchPolicy(SketchMode.OFF),
    )  # fmt: skip


def test_the_worker_answers_conversations_through_the_template(
    chat_model_dir: Path, tmp_path: Path
) -> None:
    write_random_adapter(tmp_path, "ad-chat", ModelConfig.from_model_dir(chat_model_dir))
    backend = _backend(chat_model_dir, tmp_path)
    chat = InferenceRequest(adapter_id="ad-chat", messages=CHAT, max_new_tokens=4)
    text = InferenceRequest(adapter_id="ad-chat", prompt="the price of item", max_new_tokens=4)
    for request in (chat, text):
        backend.enqueue(request)
    results = {c.result.request_id: c.result for c in backend.run_until_idle()}
    backend.close()
    tokenizer = load_tokenizer(chat_model_dir)
    answer, completion = results[chat.request_id], results[text.request_id]
    assert answer.status == "ok" and completion.status == "ok"
    assert answer.prompt_token_ids == encode_prompt(tokenizer, CHAT)
    assert answer.messages == CHAT and answer.prompt == "" and answer.prompt_input == CHAT
    assert completion.prompt_token_ids == encode_prompt(tokenizer, "the price of item")
    assert completion.messages is None and completion.prompt_input == "the price of item"


def test_a_conversation_without_a_template_is_an_error_result(
    base_model_dir: Path, tmp_path: Path
) -> None:
    backend = _backend(base_model_dir, tmp_path)
    request = InferenceRequest(adapter_id="any", messages=CHAT, max_new_tokens=4)
    backend.enqueue(request)
    (completed,) = backend.run_until_idle()
    backend.close()
    result = completed.result
    assert result.status == "error" and result.error_code is ErrorCode.INVALID_PARAMETERS
    assert result.error_message == (
        "the base model has no chat template: send a prompt instead of messages"
    )
    assert result.messages == CHAT and result.usage.completion_tokens == 0
