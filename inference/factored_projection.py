"""The factored sketch projection ("factored-countsketch-v1", LoGra-style, arXiv 2405.13954).

For a LoRA matrix W [out, in] of a linear map y = x W^T, an example's gradient is
G = sum_t g_t x_t^T (x: the map's input, g: the loss gradient at its output). The projection of
W's gradient is the small block P_out G P_in^T = sum_t (P_out g_t)(P_in x_t)^T: each side is
projected on its own, so a batch never materialises a per-example gradient. P_side is a seeded
Gaussian [d, dim] with entries N(0, 1/d), d = min(SIDE, dim); a side no wider than SIDE (a LoRA
rank) is kept whole (P = identity), which loses nothing there. The blocks of all matrices are
then folded into the index's k dimensions by a seeded count sketch (each block entry added, with
a random sign, to one random bucket): folding keeps the ranking quality of the full blocks at a
fixed k, where truncating or shrinking the blocks lowers it.

Every random choice of a matrix is seeded by sha256(kind, seed, name, part, size), generated on
the CPU: any device, and a projector of any subset of the layout, gets the same numbers for a
parameter. The whole map is linear in the gradient, so `project` (from full gradients, as the
training-time index needs them after preconditioning) and `project_factors` (from a layer's
inputs and output gradients, as the worker computes them) give the same sketch.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

FACTORED_KIND = "factored-countsketch-v1"
SIDE = 16


def _seed(seed: int, name: str, part: str, size: int) -> int:
    digest = hashlib.sha256(f"{FACTORED_KIND}:{seed}:{name}:{part}:{size}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@dataclass(frozen=True)
class _Parameter:
    out_side: torch.Tensor | None  # [d_out, out] float32, None: kept whole
    in_side: torch.Tensor | None  # [d_in, in] float32, None: kept whole
    buckets: torch.Tensor  # [d_out * d_in] int64 in [0, k)
    signs: torch.Tensor  # [d_out * d_in] float32, +-1


def _side(seed: int, name: str, part: str, size: int) -> torch.Tensor | None:
    if size <= SIDE:
        return None
    generator = torch.Generator().manual_seed(_seed(seed, name, part, size))
    return torch.randn(SIDE, size, generator=generator) / math.sqrt(SIDE)


def _apply(side: torch.Tensor | None, values: torch.Tensor) -> torch.Tensor:
    """values [..., size] -> [..., d]."""
    return values if side is None else values @ side.to(values.dtype).T


class FactoredProjector:
    """The seeded factored projection of LoRA gradients to k dimensions."""

    kind = FACTORED_KIND

    def __init__(
        self,
        layout: Sequence[tuple[str, tuple[int, ...]]],
        k: int,
        seed: int = 0,
        device: torch.device | str = "cpu",
    ) -> None:
        if k < 1:
            raise ValueError(f"k must be positive, got {k}")
        self.layout = list(layout)
        self.k = k
        self.seed = seed
        self.device = torch.device(device)
        self._parameters: dict[str, _Parameter] = {}
        for name, shape in self.layout:
            if len(shape) != 2:
                raise ValueError(f"{name} has shape {shape}; a LoRA matrix has two dimensions")
            out, inp = shape
            width = min(SIDE, out) * min(SIDE, inp)
            generator = torch.Generator().manual_seed(_seed(seed, name, "fold", k))
            buckets = torch.randint(0, k, (width,), generator=generator)
            signs = torch.randint(0, 2, (width,), generator=generator).float() * 2 - 1
            out_side, in_side = _side(seed, name, "out", out), _side(seed, name, "in", inp)
            self._parameters[name] = _Parameter(
                out_side.to(self.device) if out_side is not None else None,
                in_side.to(self.device) if in_side is not None else None,
                buckets.to(self.device),
                signs.to(self.device),
            )

    def fold(self, name: str, blocks: torch.Tensor) -> torch.Tensor:
        """[B, d_out, d_in] blocks of parameter `name` -> [B, k] in the blocks' dtype."""
        p = self._parameters[name]
        flat = blocks.reshape(blocks.shape[0], -1) * p.signs.to(blocks.dtype)
        out = torch.zeros(blocks.shape[0], self.k, dtype=blocks.dtype, device=blocks.device)
        return out.index_add_(1, p.buckets, flat)

    def project_parameter(self, name: str, grads: torch.Tensor) -> torch.Tensor:
        """grads [B, out, in] of parameter `name` -> [B, k]."""
        p = self._parameters[name]
        values = grads if grads.dtype == torch.float64 else grads.float()
        blocks = _apply(p.in_side, values)  # [B, out, d_in]
        blocks = _apply(p.out_side, blocks.transpose(1, 2)).transpose(1, 2)  # [B, d_out, d_in]
        return self.fold(name, blocks)

    def project(self, grads: dict[str, torch.Tensor]) -> torch.Tensor:
        """grads: canonical name -> [B, *shape] per-example gradients; returns [B, k]."""
        out: torch.Tensor | None = None
        for name, shape in self.layout:
            if tuple(grads[name].shape[1:]) != tuple(shape):
                raise ValueError(f"gradient of {name} has shape {grads[name].shape[1:]}, "
                                 f"expected {shape}")
            part = self.project_parameter(name, grads[name])
            out = part if out is None else out + part
        assert out is not None
        return out

    def project_factors(self, name: str, inputs: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        """The sketch of parameter `name` from its layer's inputs [B, T, in] and output
        gradients [B, T, out] (zero on tokens outside the loss's reach): [B, k]."""
        p = self._parameters[name]
        small_in = _apply(p.in_side, inputs)  # [B, T, d_in]
        small_out = _apply(p.out_side, grads)  # [B, T, d_out]
        return self.fold(name, torch.bmm(small_out.transpose(1, 2), small_in))
