"""Text in and out of the engine: a thin wrapper over a Hugging Face `tokenizer.json`."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

TOKENIZER_FILE = "tokenizer.json"


class TextCodec:
    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer

    @classmethod
    def from_file(cls, path: Path) -> TextCodec:
        return cls(Tokenizer.from_file(str(path)))

    @classmethod
    def from_model_dir(cls, model_dir: Path) -> TextCodec | None:
        """The model directory's tokenizer.json, or None when it has none."""
        path = Path(model_dir) / TOKENIZER_FILE
        return cls.from_file(path) if path.is_file() else None

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)
