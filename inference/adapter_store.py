"""The adapter store on disk: where every file of an adapter lives, and its typed manifest. Every
other module asks this one for a path or a manifest field.

`<root>/<adapter_id>/`, root = `Settings.adapters_dir`:
- `adapter_config.json`, `adapter_model.safetensors`: peft's LoRA format, as `save_pretrained`
  writes it, so any peft loader reads the adapter. The sha256 of the weights file is the
  adapter's version.
- `attribution_index/`: see `inference.attribution_index`.
- `manifest.json`: the `AdapterManifest`, written by the ModelFactory. A peft adapter without
  one is still served, but has no attribution.
- `.<adapter_id>.<pid>.staging/`: an adapter being written, renamed into place when complete;
  no adapter id starts with a dot.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import PositiveInt, ValidationError

from inference.hashing import sha256_file
from infra.settings import Settings
from schemas.codec import validation_summary
from schemas.events import AdapterFacts, AdapterRegistered
from schemas.ids import ID_RULE, Sha256Hex, is_valid_id

# The first two are peft's own names: the store keeps what `save_pretrained` writes.
_CONFIG_FILE = "adapter_config.json"
_WEIGHTS_FILE = "adapter_model.safetensors"
_MANIFEST_FILE = "manifest.json"
_INDEX_DIR = "attribution_index"


class AdapterError(Exception):
    """Base of the adapter errors; `reason` is one line a user can act on."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class UnknownAdapter(AdapterError):
    """No adapter with this id in the store (or the id itself is invalid)."""


class InvalidAdapterId(UnknownAdapter, ValueError):
    """An id that cannot name an adapter: it is not one path component of the allowed
    characters. Also a ValueError, as any other invalid argument."""


class AdapterRefused(AdapterError):
    """The adapter exists but cannot be used: its files disagree or cannot be read."""


def check_adapter_id(adapter_id: str) -> str:
    """Return the id if it is a valid adapter id, else raise InvalidAdapterId with the reason."""
    if not isinstance(adapter_id, str) or not is_valid_id(adapter_id):
        shown = adapter_id[:140] if isinstance(adapter_id, str) else adapter_id
        raise InvalidAdapterId(f"invalid adapter id {shown!r}: {ID_RULE}")
    return adapter_id


class AdapterManifest(AdapterFacts):
    """`manifest.json`: the facts AdapterRegistered announces, plus how training went. Parsed
    and validated once, when read; unknown fields are refused. No timestamps: the same inputs
    and seed give byte-identical files."""

    format: Literal["peft-lora"] = "peft-lora"
    training_rows: PositiveInt
    training_rows_hash: Sha256Hex
    first_loss: float  # training loss of the first step, rounded to 6 decimals
    last_loss: float  # and of the last step

    @classmethod
    def from_json(cls, text: str | bytes) -> AdapterManifest:
        """Raises pydantic's ValidationError (a ValueError) for anything but a valid manifest."""
        return cls.model_validate_json(text)

    def to_json(self) -> str:
        # Python-mode dump: a NaN loss stays NaN, as json.dumps writes it, not null.
        return json.dumps(self.model_dump(), indent=2, sort_keys=True) + "\n"

    def registration_event(self) -> AdapterRegistered:
        """The AdapterRegistered event announcing this adapter."""
        return AdapterRegistered(**self.model_dump(include=set(AdapterFacts.model_fields)))


@dataclass(frozen=True)
class AdapterDir:
    """The paths of one adapter directory, and reading and writing its manifest."""

    path: Path

    @property
    def adapter_id(self) -> str:
        return self.path.name

    @property
    def config_path(self) -> Path:
        return self.path / _CONFIG_FILE

    @property
    def weights_path(self) -> Path:
        return self.path / _WEIGHTS_FILE

    @property
    def manifest_path(self) -> Path:
        return self.path / _MANIFEST_FILE

    @property
    def index_dir(self) -> Path:
        return self.path / _INDEX_DIR

    def has_peft_files(self) -> bool:
        return self.config_path.is_file() and self.weights_path.is_file()

    def weights_hash(self) -> str:
        """The adapter's version: the sha256 of its weights file."""
        return sha256_file(self.weights_path)

    def read_manifest(self) -> AdapterManifest | None:
        """The manifest, or None when the directory has none; AdapterRefused when it cannot be
        read or is not a valid manifest."""
        try:
            text = self.manifest_path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise AdapterRefused(
                f"adapter {self.adapter_id!r}: cannot read {_MANIFEST_FILE}: {exc}"
            ) from None
        try:
            return AdapterManifest.from_json(text)
        except ValidationError as exc:
            summary = validation_summary(exc, whole="manifest")
            raise AdapterRefused(
                f"adapter {self.adapter_id!r}: invalid {_MANIFEST_FILE}: {summary}"
            ) from None

    def write_manifest(self, manifest: AdapterManifest) -> None:
        self.manifest_path.write_text(manifest.to_json())


class AdapterStore:
    """`root/<adapter_id>/`: one directory per adapter. An id is validated before it becomes a
    path, so it always names exactly one child of root."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @classmethod
    def from_settings(cls, settings: Settings) -> AdapterStore:
        return cls(settings.adapters_dir)

    def adapter_dir(self, adapter_id: str) -> AdapterDir:
        """The adapter's directory (which may not exist); InvalidAdapterId for a bad id."""
        return AdapterDir(self.root / check_adapter_id(adapter_id))

    def staging_dir(self, adapter_id: str) -> AdapterDir:
        """Where this process writes the adapter before renaming it into place."""
        return AdapterDir(self.root / f".{check_adapter_id(adapter_id)}.{os.getpid()}.staging")

    def exists(self, adapter_id: str) -> bool:
        """Whether the store holds a servable adapter (its peft files) with this id."""
        try:
            return self.adapter_dir(adapter_id).has_peft_files()
        except InvalidAdapterId:
            return False

    def ids(self) -> Iterator[str]:
        """Ids of the servable adapters, sorted."""
        for child in self._children():
            if self.exists(child.name):
                yield child.name

    def manifest(self, adapter_id: str) -> AdapterManifest:
        """The adapter's manifest; UnknownAdapter when it has none, AdapterRefused when it is
        invalid."""
        manifest = self.adapter_dir(adapter_id).read_manifest()
        if manifest is None:
            raise UnknownAdapter(
                f"unknown adapter {adapter_id!r}: train it with `loraledger train`"
            )
        return manifest

    def manifests(self) -> list[AdapterManifest]:
        """The manifest of every adapter that has one, by id."""
        return [
            self.manifest(child.name)
            for child in self._children()
            if AdapterDir(child).manifest_path.is_file()
        ]

    def _children(self) -> list[Path]:
        # Staging directories and anything else whose name is no adapter id are skipped.
        if not self.root.is_dir():
            return []
        return [child for child in sorted(self.root.iterdir()) if is_valid_id(child.name)]
