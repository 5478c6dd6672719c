"""A real pretrained checkpoint end to end: SmolLM2-135M-Instruct (Llama, grouped-query
attention 9/3, tied embeddings, rope_theta 1e5, a tokenizer that adds no BOS, a chat template),
imported from its Q4_1 GGUF file. transformers and peft are the references throughout."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from smollm2 import smollm2_gguf
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase
from typer.testing import CliRunner

from inference.attribution_index import AttributionIndex
from inference.config import LORA_TARGETS
from inference.data import generate_datanet
from inference.datanets import DatanetStore
from inference.engine import GenerationRequest
from inference.hashing import base_model_hash
from inference.model import ForwardBatch, SequenceChunk, load_model
from inference.text_codec import TextCodec
from inference.tokenizer import encode_prompt, load_tokenizer
from inference.worker.backend import BackendConfig, ServingBackend
from inference.worker.sketching import SketchMode, SketchPolicy
from infra.settings import load_settings
from loraledger.cli import app
from schemas.events import ChatMessage, InferenceRequest

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "Once upon a time, a small robot", "def fibonacci(n):"]
CHAT = [
    ChatMessage(role="system", content="You are a concise assistant."),
    ChatMessage(role="user", content="Name three primary colours."),
]
NEW_TOKENS = 6
# (adapter id, rank, target modules): ranks 8 to 64, each its own targets.
ADAPTERS = [
    ("smol-r8", 8, ["q_proj", "v_proj"]),
    ("smol-r16", 16, ["q_proj", "k_proj", "v_proj", "o_proj"]),
    ("smol-r32", 32, ["gate_proj", "up_proj", "down_proj"]),
    ("smol-r64", 64, list(LORA_TARGETS)),
]


@pytest.fixture(scope="module")
def hf_model(smollm2_dir: Path) -> torch.nn.Module:
    torch.set_num_threads(2)
    return AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def hf_tokenizer(smollm2_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(smollm2_dir)


def _chat_ids(hf_tokenizer: PreTrainedTokenizerBase, messages: list[ChatMessage]) -> list[int]:
    return list(
        hf_tokenizer.apply_chat_template(
            [m.model_dump() for m in messages],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=False,
        )
    )


@pytest.fixture(scope="module")
def base_greedy(hf_model: torch.nn.Module) -> Callable[[list[int]], list[int]]:
    """transformers' greedy answer of the base model to a prompt's ids, computed once."""
    answers: dict[tuple[int, ...], list[int]] = {}

    def answer(prompt_ids: list[int]) -> list[int]:
        if tuple(prompt_ids) not in answers:
            answers[tuple(prompt_ids)] = _greedy(hf_model, prompt_ids)
        return answers[tuple(prompt_ids)]

    return answer


@torch.no_grad()
def _greedy(model: torch.nn.Module, prompt_ids: list[int]) -> list[int]:
    """transformers' greedy generation, the end-of-sequence token left out as the engine does."""
    output = model.generate(
        torch.tensor([prompt_ids]), max_new_tokens=NEW_TOKENS, do_sample=False, top_p=None
    )[0, len(prompt_ids) :].tolist()
    eos = model.generation_config.eos_token_id
    return output[:-1] if output and output[-1] == eos else output


def test_prompts_tokenize_as_transformers_and_chat_as_its_template(
    smollm2_dir: Path, hf_tokenizer
) -> None:
    ours = load_tokenizer(smollm2_dir)
    for text in PROMPTS:
        expected = hf_tokenizer(text)["input_ids"]
        assert encode_prompt(ours, text) == expected
        assert expected[0] != hf_tokenizer.bos_token_id  # this tokenizer adds no BOS
    conversations = [CHAT, CHAT[1:], [*CHAT, ChatMessage(role="assistant", content="Red."),
                                      ChatMessage(role="user", content="Two more?")]]  # fmt: skip
    for messages in conversations:
        assert encode_prompt(ours, messages) == _chat_ids(hf_tokenizer, messages)


def test_logits_match_transformers(smollm2_dir: Path, hf_model, hf_tokenizer) -> None:
    model = load_model(smollm2_dir)
    sequences = [hf_tokenizer(text)["input_ids"] for text in PROMPTS[:2]]
    cache = model.new_cache(len(sequences), 64)
    chunks = [
        SequenceChunk(kv_row=row, start_position=0, token_ids=ids, logits="all")
        for row, ids in enumerate(sequences)
    ]
    logits = model(ForwardBatch.build(chunks, "cpu"), cache)
    start = 0
    for ids in sequences:
        with torch.no_grad():
            expected = hf_model(torch.tensor([ids])).logits[0]
        torch.testing.assert_close(logits[start : start + len(ids)], expected, atol=1e-4, rtol=0)
        start += len(ids)


def test_generate_command_answers_as_transformers(
    smollm2_dir: Path, hf_tokenizer, base_greedy, tmp_path: Path
) -> None:
    env = {"LORALEDGER_HOME": str(tmp_path), "LORALEDGER_BASE_MODEL": str(smollm2_dir)}
    runs = [(PROMPTS[0], []), (CHAT[1].content, ["--chat"])]
    for prompt, extra in runs:
        command = ["generate", "--prompt", prompt, "--max-new-tokens", str(NEW_TOKENS), "--json"]
        done = CliRunner().invoke(app, [*command, *extra], env=env)
        assert done.exit_code == 0, done.output
        result = json.loads(done.output)
        expected_prompt = (
            _chat_ids(hf_tokenizer, [ChatMessage(role="user", content=prompt)])
            if extra
            else hf_tokenizer(prompt)["input_ids"]
        )
        assert result["prompt_token_ids"] == expected_prompt
        assert result["output_token_ids"] == base_greedy(expected_prompt), prompt
        assert result["output_text"] == hf_tokenizer.decode(
            result["output_token_ids"], skip_special_tokens=True)


def test_text_is_decoded_as_transformers_decodes_it(smollm2_dir: Path, hf_tokenizer) -> None:
    # The checkpoint asks for clean_up_tokenization_spaces, which transformers applies to
    # WordPiece tokenizers only: on this byte-level BPE its decode is the tokenizer file's.
    ids = hf_tokenizer("I do n't know , do you ? It 's fine .", add_special_tokens=False)[
        "input_ids"]
    decoded = TextCodec.from_model_dir(smollm2_dir).decode(ids)
    assert decoded == hf_tokenizer.decode(ids, skip_special_tokens=True)
    assert decoded == "I do n't know , do you ? It 's fine ."


@pytest.fixture(scope="module")
def peft_adapters(hf_model, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Adapters made and saved by peft, with lora_B drawn at random (peft starts it at zero,
    which would hide every bug)."""
    store = tmp_path_factory.mktemp("smol-adapters")
    base = hf_model
    for number, (adapter_id, rank, targets) in enumerate(ADAPTERS):
        torch.manual_seed(number)
        config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets,
                            lora_dropout=0.0, task_type="CAUSAL_LM")  # fmt: skip
        model = get_peft_model(base, config)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0.0, 0.1)
        model.save_pretrained(store / adapter_id, safe_serialization=True)
        base = model.unload()
    return store


def test_a_mixed_batch_of_peft_adapters_matches_peft(
    smollm2_dir: Path, hf_model, hf_tokenizer, base_greedy, peft_adapters: Path
) -> None:
    """Default serving settings: every rank class from 8 to 64 has device slots on this
    model. One batch holds requests of all four adapters, a conversation among them."""
    requests = [
        # Open-ended prompts: the code prompt's greedy answer resists some adapters.
        InferenceRequest(adapter_id=adapter_id, prompt=PROMPTS[i % 2], max_new_tokens=NEW_TOKENS)
        for i, (adapter_id, _, _) in enumerate(ADAPTERS)
    ]  # fmt: skip
    chat = InferenceRequest(adapter_id="smol-r16", messages=CHAT, max_new_tokens=NEW_TOKENS)
    requests.append(chat)
    backend = ServingBackend.build(
        smollm2_dir, peft_adapters, worker_id="w-smol",
        config=BackendConfig(max_batch=8, max_seq_len=256),
        sketch_policy=SketchPolicy(SketchMode.OFF),
    )  # fmt: skip
    try:
        for request in requests:
            backend.enqueue(request)
        results = {c.result.request_id: c.result for c in backend.run_until_idle()}
        base_outputs = backend.engine.generate(
            [GenerationRequest(prompt_ids=hf_tokenizer(p)["input_ids"], max_new_tokens=NEW_TOKENS)
             for p in PROMPTS]
        )  # fmt: skip
    finally:
        backend.close()
    for prompt, generation in zip(PROMPTS, base_outputs, strict=True):
        assert generation.output_ids == base_greedy(hf_tokenizer(prompt)["input_ids"])
    first_id = ADAPTERS[0][0]
    reference = PeftModel.from_pretrained(hf_model, peft_adapters / first_id, adapter_name=first_id)
    try:
        for adapter_id, _, _ in ADAPTERS[1:]:
            reference.load_adapter(peft_adapters / adapter_id, adapter_name=adapter_id)
        for request in requests:
            result = results[request.request_id]
            assert result.status == "ok", result.error_message
            prompt_ids = (
                hf_tokenizer(request.prompt)["input_ids"]
                if request.messages is None
                else _chat_ids(hf_tokenizer, request.messages)
            )
            assert result.prompt_token_ids == prompt_ids
            reference.set_adapter(request.adapter_id)
            expected = _greedy(reference, prompt_ids)
            assert result.output_token_ids == expected, request.adapter_id
            if request.prompt is not None:  # the adapter matters
                assert expected != base_greedy(prompt_ids), request.adapter_id
    finally:
        reference.unload()


def test_import_train_and_index_on_the_checkpoint(smollm2_dir: Path, tmp_path: Path) -> None:
    """`loraledger base-model import` of the GGUF file (its conversion is cached), then
    `loraledger train` on a small datanet and its attribution index."""
    cache = load_settings().cache_dir
    env = {
        "LORALEDGER_HOME": str(tmp_path),
        "LORALEDGER_BASE_MODEL": str(tmp_path / "base-model"),
        "LORALEDGER_CACHE": str(cache),
    }
    imported = CliRunner().invoke(app, ["base-model", "import", str(smollm2_gguf(cache))], env=env)
    assert imported.exit_code == 0, imported.output
    weights_hash = base_model_hash(smollm2_dir)
    assert base_model_hash(tmp_path / "base-model") == weights_hash
    assert (
        f"base model: LlamaForCausalLM, 134,515,008 parameters, weights {weights_hash}, "
        "chat template yes (GGUF, dequantized, conversion cached)"
    ) in imported.output
    settings = load_settings(env)
    synthetic = generate_datanet("smol", seed=0, contributors=2, rows_per_contributor=3)
    store = DatanetStore(settings.datanets_dir)
    store.create("smol", "a few rows")
    for row in synthetic.rows:
        store.add("smol", row.contributor_id, row.text, row.license)
    store.snapshot("smol")
    trained = CliRunner().invoke(
        app,
        ["train", "--datanet", "smol", "--adapter-id", "smol-a", "--owner", "owner-1",
         "--rank", "8", "--steps", "3", "--batch-size", "2", "--k", "32",
         "--index-estimator", "trak", "--no-publish"],
        env=env,
    )  # fmt: skip
    assert trained.exit_code == 0, trained.output
    adapter = settings.adapters_dir / "smol-a"
    manifest = json.loads((adapter / "manifest.json").read_text())
    assert manifest["base_model_hash"] == weights_hash
    index = AttributionIndex.load(adapter / "attribution_index", manifest["index_hash"])
    assert len(index) == len(synthetic.rows) and index.features.shape == (len(index), 32)
    assert torch.isfinite(torch.from_numpy(index.features)).all()
