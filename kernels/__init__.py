"""Triton LoRA kernels (SGMV, BGMV), the PyTorch reference and device dispatch.

The model calls `add_lora` with a `LoraBatch` built once per forward pass; the kernel modules
(`sgmv_shrink`, `sgmv_expand`, `bgmv_shrink`, `bgmv_expand`) import Triton and are loaded only
when a Triton backend runs.
"""

from kernels.batch import LoraBatch, Segments
from kernels.dispatch import BACKENDS, Backend, add_lora, add_lora_trusted, use_backend

__all__ = [
    "BACKENDS",
    "Backend",
    "LoraBatch",
    "Segments",
    "add_lora",
    "add_lora_trusted",
    "use_backend",
]
