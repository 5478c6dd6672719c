"""Text in and out of the engine: prompts encoded by the checkpoint's own rules
(`inference.tokenizer.encode_prompt`), token ids decoded by its `tokenizer.json`."""

from __future__ import annotations

from pathlib import Path

from transformers import PreTrainedTokenizerBase

from inference.tokenizer import Prompt, encode_prompt, load_tokenizer

TOKENIZER_FILE = "tokenizer.json"


class TextCodec:
    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer

    @classmethod
    def from_model_dir(cls, model_dir: Path) -> TextCodec | None:
        """The model directory's tokenizer, or None when it has no tokenizer.json."""
        model_dir = Path(model_dir)
        return cls(load_tokenizer(model_dir)) if (model_dir / TOKENIZER_FILE).is_file() else None

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.backend_tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, prompt: Prompt) -> list[int]:
        """Token ids of a prompt text or of a conversation rendered with the chat template."""
        return encode_prompt(self.tokenizer, prompt)

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.backend_tokenizer.decode(token_ids, skip_special_tokens=True)
