"""Content hashes that name artifacts: adapters, base models, indexes and snapshots."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_files(paths: list[Path]) -> str:
    """One hash over several files, in the given order, each prefixed by its name and size
    so that moving bytes between files changes the hash."""
    digest = hashlib.sha256()
    for path in paths:
        path = Path(path)
        _update_named(digest, path.name, path.stat().st_size, bytes.fromhex(sha256_file(path)))
    return digest.hexdigest()


def sha256_named(parts: Iterable[tuple[str, bytes]]) -> str:
    """`sha256_files` over contents already in memory, given as (file name, bytes): the same
    encoding, so both give one hash for the same files."""
    digest = hashlib.sha256()
    for name, data in parts:
        _update_named(digest, name, len(data), hashlib.sha256(data).digest())
    return digest.hexdigest()


def _update_named(digest: hashlib._Hash, name: str, size: int, content_digest: bytes) -> None:
    digest.update(f"{name}\0{size}\0".encode())
    digest.update(content_digest)


def base_model_hash(model_dir: Path) -> str:
    """Hash of a Hugging Face checkpoint's weights (all *.safetensors shards, sorted)."""
    shards = sorted(Path(model_dir).glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"no *.safetensors weights in {model_dir}")
    return sha256_files(shards)
