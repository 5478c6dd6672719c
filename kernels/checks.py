"""Input checks shared by the dispatch function and the kernel wrappers.

Each check raises with one line that names the argument, what was expected and what came in.
"""

from __future__ import annotations

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)


def check_dim(name: str, tensor: Tensor, dims: int, layout: str) -> None:
    if tensor.dim() != dims:
        raise ValueError(f"{name} must be {layout}, got shape {tuple(tensor.shape)}")


def check_dtype(name: str, tensor: Tensor, allowed: tuple[torch.dtype, ...]) -> None:
    if tensor.dtype not in allowed:
        names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
        raise TypeError(f"{name} must have dtype in ({names}), got {tensor.dtype}")


def check_same_dtype(**tensors: Tensor) -> None:
    dtypes = {name: t.dtype for name, t in tensors.items()}
    if len(set(dtypes.values())) > 1:
        found = ", ".join(f"{n}={str(d).removeprefix('torch.')}" for n, d in dtypes.items())
        raise TypeError(f"inputs must share one dtype, got {found}")


def check_same_device(**tensors: Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        found = ", ".join(f"{n}={d}" for n, d in devices.items())
        raise ValueError(f"inputs must be on one device, got {found}")


def check_contiguous(name: str, tensor: Tensor) -> None:
    if not tensor.is_contiguous():
        raise ValueError(f"{name} must be contiguous; call .contiguous() on it first")


def check_rows_unit_stride(name: str, tensor: Tensor) -> None:
    """Rows may be strided (a column slice of a fused output) but each row must be dense."""
    if tensor.shape[1] > 1 and tensor.stride(1) != 1:
        raise ValueError(
            f"{name} must have unit stride along its last dimension, got strides {tensor.stride()}"
        )


def check_size(name: str, actual: int, expected: int, what: str) -> None:
    if actual != expected:
        raise ValueError(f"{name} has {actual} {what}, expected {expected}")
