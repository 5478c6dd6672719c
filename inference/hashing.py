"""Content hashes that name artifacts: adapters, base models, indexes and snapshots."""

from __future__ import annotations

import hashlib
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
        digest.update(f"{path.name}\0{path.stat().st_size}\0".encode())
        digest.update(bytes.fromhex(sha256_file(path)))
    return digest.hexdigest()


def base_model_hash(model_dir: Path) -> str:
    """Hash of a Hugging Face checkpoint's weights (all *.safetensors shards, sorted)."""
    shards = sorted(Path(model_dir).glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"no *.safetensors weights in {model_dir}")
    return sha256_files(shards)
