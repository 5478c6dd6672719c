"""The adapter store on disk: where every file of an adapter lives, and its typed manifest. Every
other module asks this one for a path or a manifest field.

`<root>/<adapter_id>/`, root = `Settings.adapters_dir`:
- `adapter_config.json`, `adapter_model.safetensors`: peft's LoRA format, as `save_pretrained`
  writes it, so any peft loader reads the adapter. The adapter's version, `adapter_hash`,
  covers both files (`AdapterFiles.adapter_hash`): the config decides the output as much as the
  weights do (its lora_alpha scales every delta), so no byte that is served is outside it.
- `attribution_index/`: see `inference.attribution_index`.
- `manifest.json`: the `AdapterManifest`, written by the ModelFactory; its `adapter_hash` must
  equal the files' (`check_integrity`). A manifest without one (written before the hash
  covered the config) is refused: nothing pinned that config, so the adapter is retrained. A
  peft adapter without any manifest is still served, unattributed; its results name the
  version that served them.
- `.<adapter_id>.<pid>.staging/`: an adapter being written, renamed into place when complete;
  no adapter id starts with a dot.

Adapters are read only through real directories and regular files: the adapter directory and
every file read in it are opened without following symbolic links (relative to the store
root), so nothing outside the store is ever served, and a FIFO or device cannot block a read.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import PositiveInt, ValidationError

from inference.hashing import sha256_file, sha256_named
from infra.settings import Settings
from schemas.codec import validation_summary
from schemas.events import AdapterFacts, AdapterRegistered
from schemas.ids import ID_RULE, Sha256Hex, is_valid_id

# The first two are peft's own names: the store keeps what `save_pretrained` writes.
_CONFIG_FILE = "adapter_config.json"
_WEIGHTS_FILE = "adapter_model.safetensors"
_MANIFEST_FILE = "manifest.json"
_INDEX_DIR = "attribution_index"
# peft writes configs of about a kilobyte; the bound keeps parsing a hostile one cheap.
MAX_CONFIG_BYTES = 1 << 20
MAX_MANIFEST_BYTES = 1 << 20


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
    # sha256 over the config and the weights (`AdapterFiles.adapter_hash`); None only in
    # manifests written before it existed, which are refused when served.
    adapter_hash: Sha256Hex | None = None

    @classmethod
    def from_json(cls, text: str | bytes) -> AdapterManifest:
        """Raises pydantic's ValidationError (a ValueError) for anything but a valid manifest."""
        return cls.model_validate_json(text)

    def to_json(self) -> str:
        # Python-mode dump: a NaN loss stays NaN, as json.dumps writes it, not null. A manifest
        # read without adapter_hash is written back byte for byte.
        fields = self.model_dump(exclude={"adapter_hash"} if self.adapter_hash is None else None)
        return json.dumps(fields, indent=2, sort_keys=True) + "\n"

    def registration_event(self) -> AdapterRegistered:
        """The AdapterRegistered event announcing this adapter."""
        return AdapterRegistered(**self.model_dump(include=set(AdapterFacts.model_fields)))


@dataclass(frozen=True)
class AdapterFiles:
    """The bytes of an adapter's peft files, read once: what is hashed is what is parsed."""

    config: bytes
    weights: bytes

    @property
    def adapter_hash(self) -> str:
        """The adapter's version: one hash over the config and the weights (the encoding of
        `inference.hashing.sha256_files`, so `sha256sum`-style tools can recompute it)."""
        return sha256_named([(_CONFIG_FILE, self.config), (_WEIGHTS_FILE, self.weights)])

    @property
    def weights_hash(self) -> str:
        return hashlib.sha256(self.weights).hexdigest()


@dataclass(frozen=True)
class AdapterDir:
    """The paths of one adapter directory, and reading and writing its manifest."""

    CONFIG_FILE: ClassVar[str] = _CONFIG_FILE
    WEIGHTS_FILE: ClassVar[str] = _WEIGHTS_FILE

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
        """The sha256 of the weights file alone (the manifest's `weights_hash`)."""
        return sha256_file(self.weights_path)

    def adapter_hash(self) -> str:
        """The adapter's version, over config and weights; raises like `read_files`."""
        return self.read_files().adapter_hash

    def read_files(self) -> AdapterFiles:
        """The peft files' bytes. UnknownAdapter when one is missing; AdapterRefused when the
        directory or a file is a symbolic link or not a regular file, or cannot be read."""
        with self._open_dir() as directory:
            return AdapterFiles(
                config=directory.read(_CONFIG_FILE, MAX_CONFIG_BYTES),
                weights=directory.read(_WEIGHTS_FILE, None),
            )

    def read_manifest(self) -> AdapterManifest | None:
        """The manifest, or None when the directory has none; AdapterRefused when it cannot be
        read or is not a valid manifest."""
        try:
            with self._open_dir() as directory:
                text = directory.read(_MANIFEST_FILE, MAX_MANIFEST_BYTES)
        except UnknownAdapter:
            return None
        try:
            return AdapterManifest.from_json(text)
        except ValidationError as exc:
            summary = validation_summary(exc, whole="manifest")
            raise AdapterRefused(
                f"adapter {self.adapter_id!r}: invalid {_MANIFEST_FILE}: {summary}"
            ) from None

    def write_manifest(self, manifest: AdapterManifest) -> None:
        self.manifest_path.write_text(manifest.to_json())

    def _open_dir(self) -> _OpenDir:
        return _OpenDir(self)


def check_integrity(adapter_id: str, files: AdapterFiles, manifest: AdapterManifest) -> None:
    """Raise AdapterRefused unless the files are the ones the manifest registered."""
    if manifest.adapter_hash is None:
        raise AdapterRefused(
            f"adapter {adapter_id!r}: its {_MANIFEST_FILE} has no adapter_hash, so nothing pins "
            f"its {_CONFIG_FILE}; retrain it with `loraledger train` to serve it"
        )
    if files.weights_hash != manifest.weights_hash:
        raise AdapterRefused(
            f"adapter {adapter_id!r}: sha256 of {_WEIGHTS_FILE} is {files.weights_hash[:12]}..., "
            f"the manifest says {manifest.weights_hash[:12]}...: the weights were changed or "
            "corrupted"
        )
    if files.adapter_hash != manifest.adapter_hash:
        raise AdapterRefused(
            f"adapter {adapter_id!r}: adapter hash {files.adapter_hash[:12]}... differs from the "
            f"manifest's {manifest.adapter_hash[:12]}...: {_CONFIG_FILE} was changed after "
            "registration"
        )


class _OpenDir:
    """An adapter directory opened without following links, relative to the store root: files
    are then opened relative to it, so a link swapped in between cannot redirect a read."""

    def __init__(self, adapter: AdapterDir) -> None:
        self.adapter = adapter
        self.fd = -1

    def __enter__(self) -> _OpenDir:
        adapter = self.adapter
        name = adapter.path.name
        try:
            root = os.open(adapter.path.parent, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            raise UnknownAdapter(
                f"no adapter {adapter.adapter_id!r} in the adapter store"
            ) from None
        try:
            self.fd = self._open(root, name, os.O_DIRECTORY, "its directory")
        finally:
            os.close(root)
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)

    def read(self, name: str, limit: int | None) -> bytes:
        fd = self._open(self.fd, name, 0, name)
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise self._refused(f"{name} is not a regular file")
            if limit is not None and info.st_size > limit:
                raise self._refused(f"{name} has {info.st_size} bytes, more than {limit}")
            with os.fdopen(os.dup(fd), "rb") as handle:
                return handle.read()
        except OSError as exc:
            raise self._refused(f"cannot read {name}: {exc.strerror or exc}") from None
        finally:
            os.close(fd)

    def _open(self, dir_fd: int, name: str, flags: int, what: str) -> int:
        # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer.
        try:
            return os.open(
                name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | flags, dir_fd=dir_fd
            )
        except FileNotFoundError:
            raise UnknownAdapter(
                f"adapter {self.adapter.adapter_id!r} needs {_CONFIG_FILE} and {_WEIGHTS_FILE} "
                "in its directory"
            ) from None
        except OSError as exc:
            # O_NOFOLLOW fails on a link with ELOOP, or ENOTDIR when a directory was asked.
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                if _is_link(name, dir_fd):
                    raise self._refused(
                        f"{what} is a symbolic link; the store serves only real files and "
                        "directories inside it"
                    ) from None
                raise self._refused(f"{what} is not a directory") from None
            raise self._refused(f"cannot open {name}: {exc.strerror or exc}") from None

    def _refused(self, why: str) -> AdapterRefused:
        return AdapterRefused(f"adapter {self.adapter.adapter_id!r}: {why}")


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


def _is_link(name: str, dir_fd: int) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False
