"""Tokenizers: how a checkpoint turns a prompt into token ids, and the byte-level BPE trained
locally for the project's own base model.

A prompt is encoded exactly as transformers encodes it for the checkpoint, by `encode_prompts`,
the one place prompts become ids (generation, the worker, training and sketches all call it):
- text: `tokenizer(text)`, with the tokenizer's own special-token rules (the post-processor
  of `tokenizer.json`, `add_bos_token` / `add_eos_token` of `tokenizer_config.json`); nothing
  is prepended by hand, so a checkpoint whose tokenizer adds no BOS gets none;
- a conversation: rendered with the checkpoint's chat template as
  `apply_chat_template(messages, add_generation_prompt=True, tokenize=False)` renders it, then
  encoded without added special tokens (the template writes them), as
  `apply_chat_template(..., tokenize=True)` does.

The local tokenizer declares its BOS the same way (a template that puts `<s>` before the text),
so its prompts start with BOS through the same rules. Byte-level pre-tokenization splits text
before each space, so a prompt and a completion that starts with a space tokenize to the same
ids apart as together; `inference.sketch.encode_pairs` relies on it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from schemas.events import ChatMessage

PAD_TOKEN = "<pad>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN)  # ids 0, 1, 2

# A prompt: plain text, or a conversation for the checkpoint's chat template.
Prompt = str | Sequence[ChatMessage]


class NoChatTemplate(ValueError):
    """The checkpoint's tokenizer has no chat template, so a conversation cannot be rendered."""


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts`; its rules put BOS before every encoded text. Training
    runs on one thread so merges that tie on frequency always resolve the same way."""
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(
            f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)} (bytes + specials)"
        )
    previous = os.environ.get("RAYON_NUM_THREADS")
    os.environ["RAYON_NUM_THREADS"] = "1"
    try:
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tokenizer.train_from_iterator(list(texts), trainer=trainer)
    finally:
        if previous is None:
            os.environ.pop("RAYON_NUM_THREADS", None)
        else:
            os.environ["RAYON_NUM_THREADS"] = previous
    # add_bos_token writes the BOS template into tokenizer.json's post-processor, so every
    # reader of the file (transformers or the tokenizers library) adds it.
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        add_bos_token=True,
        model_max_length=1 << 20,
    )


def save_tokenizer(tokenizer: PreTrainedTokenizerBase, directory: Path) -> None:
    tokenizer.save_pretrained(str(directory))


def load_tokenizer(directory: Path) -> PreTrainedTokenizerBase:
    """The tokenizer saved beside a checkpoint, as transformers' AutoTokenizer loads it (so the
    checkpoint's tokenizer class and configuration apply). Without a pad token, eos pads."""
    directory = Path(directory)
    if not (directory / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer.json in {directory}")
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        # Many released checkpoints have no pad token; padding is masked out, so eos serves.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def render_chat(tokenizer: PreTrainedTokenizerBase, messages: Sequence[ChatMessage]) -> str:
    """The conversation as the checkpoint's chat template renders it, ending with the prompt
    for the assistant's turn. Raises NoChatTemplate when the checkpoint has none."""
    if not getattr(tokenizer, "chat_template", None):
        raise NoChatTemplate(
            "the base model has no chat template: send a prompt instead of messages"
        )
    return tokenizer.apply_chat_template(
        [{"role": message.role, "content": message.content} for message in messages],
        add_generation_prompt=True,
        tokenize=False,
    )


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Prompt]
) -> list[list[int]]:
    """The token ids of each prompt, by the checkpoint's rules (see the module docstring). Texts
    are encoded in one call."""
    texts = [(i, prompt) for i, prompt in enumerate(prompts) if isinstance(prompt, str)]
    encoded: list[list[int]] = [[] for _ in prompts]
    if texts:
        ids = tokenizer([text for _, text in texts], add_special_tokens=True)["input_ids"]
        for (i, _), row in zip(texts, ids, strict=True):
            encoded[i] = list(row)
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            rendered = render_chat(tokenizer, prompt)
            encoded[i] = list(tokenizer(rendered, add_special_tokens=False)["input_ids"])
    return encoded


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: Prompt) -> list[int]:
    """The token ids of one prompt: `encode_prompts` of one."""
    return encode_prompts(tokenizer, [prompt])[0]


def added_prefix_length(tokenizer: PreTrainedTokenizerBase) -> int:
    """How many special tokens the tokenizer's rules put before a text (1 for a BOS, 0 when it
    adds none), found by encoding a probe with and without them."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return start
    return 0
