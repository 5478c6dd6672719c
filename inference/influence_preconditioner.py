"""The `ekfac-projected` estimator of the attribution index: EK-FAC influence seen through the
sketch's random projection.

Influence of training example i on a query q: g_q^T H^-1 g_i. The query side is only known as
its sketch q = R g_q (R: the index's projection, [k, P], k < P), so the index stores, per
example, the w_i for which q . w_i is the best linear estimate of g_q^T H^-1 g_i when query
gradients are drawn from a prior g_q ~ N(0, S):
    w_i = (R S R^T)^-1 R S H^-1 g_i.
(With k >= P and an invertible R this is exactly g_q^T H^-1 g_i, whatever S; with k < P the
prior decides how the directions R drops are filled in.) TRAK is the case S = H, estimated
from the N sketches alone (rank N < k).

H and S are both EK-FAC matrices, per LoRA layer (each A and each B matrix on its own):
- H over the training texts with their training loss (the pairs ("", text));
- S over query-like pairs: the training texts cut into a prompt and a completion
  (`query_like_pairs`), so the prior describes gradients of a completion's loss given its
  context, which is what the worker sketches. On the planted-fact benchmark this prior scores a
  higher LDS than S = H.
EK-FAC for a layer y = x W^T: A = mean over tokens of x x^T, G = mean over tokens of g g^T (g:
the gradient of the example's loss at y), eigendecomposed A = Q_A diag(.) Q_A^T, G = Q_G
diag(.) Q_G^T; the eigenvalues are corrected to the mean over examples of (Q_G^T G_i Q_A)^2,
with G_i the example's gradient [out, in], and damped by a multiple of their mean (scale-free).
R S R^T is summed layer by layer from the projections of S's eigenvectors. Everything is
computed on the CPU in float64 from a fixed batching, so the same inputs give the same bytes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from inference.sketch import AnyProjector, collate, encode_pairs, lora_layers, per_example_loss

DEFAULT_DAMPING_RELATIVE = 0.01
DEFAULT_PRIOR_DAMPING_RELATIVE = 0.1
# Where training texts are cut into (prompt, completion) pairs for the query prior, as
# fractions of their words.
QUERY_SPLITS = (0.5, 0.75)
# Eigenvectors projected per batch when building R S R^T.
EIGENVECTOR_BATCH = 512
# Ridge on R S R^T, relative to its mean eigenvalue: R S R^T has rank P < k when the adapter has
# fewer parameters than sketch dimensions, and the solve must still be defined.
SOLVE_RIDGE_RELATIVE = 1e-6

Layers = Sequence[tuple[str, nn.Linear]]


@dataclass(frozen=True)
class LayerFactors:
    input_basis: torch.Tensor  # [in, in] Q_A, float64
    output_basis: torch.Tensor  # [out, out] Q_G, float64
    eigenvalues: torch.Tensor  # [out, in] corrected eigenvalue + damping, float64


@contextmanager
def _capture(layers: Layers) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Each LoRA layer's [input, output] of one forward pass."""
    captured: dict[str, list[torch.Tensor]] = {name: [] for name, _ in layers}

    def hook_for(name: str):
        def hook(_module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor):
            captured[name] += [inputs[0].detach(), output]

        return hook

    handles = [layer.register_forward_hook(hook_for(name)) for name, layer in layers]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token")
    return int(pad)


def _batches(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[tuple[str, str]],
    max_length: int,
    batch_size: int,
    layers: Layers,
) -> Iterator[tuple[torch.Tensor, dict[str, tuple[torch.Tensor, torch.Tensor]]]]:
    """Per batch: the attention mask [B, T] and, per layer, (inputs [B, T, in], output
    gradients [B, T, out]) in float64, of each example's own loss."""
    device = next(model.parameters()).device
    encoded = encode_pairs(tokenizer, pairs, max_length)
    modes = [(module, module.training) for module in model.modules() if module.training]
    if modes:
        model.eval()
    try:
        for start in range(0, len(encoded), batch_size):
            ids, mask, labels = collate(
                encoded[start : start + batch_size], _pad_id(tokenizer), device
            )
            with _capture(layers) as captured:
                losses = per_example_loss(model, ids, mask, labels)
            outputs = [captured[name][1] for name, _ in layers]
            grads = torch.autograd.grad(losses.sum(), outputs)
            yield (
                mask.cpu(),
                {
                    name: (captured[name][0].double().cpu(), g.double().cpu())
                    for (name, _), g in zip(layers, grads, strict=True)
                },
            )
    finally:
        for module, training in modes:
            module.training = training


def _example_gradients(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return torch.einsum("bto,bti->boi", g, x)


def fit_factors(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[tuple[str, str]],
    max_length: int,
    batch_size: int = 32,
    damping_relative: float = DEFAULT_DAMPING_RELATIVE,
    layers: Layers | None = None,
) -> dict[str, LayerFactors]:
    """EK-FAC factors of every LoRA layer (canonical weight name -> factors) over `pairs`."""
    if not pairs:
        raise ValueError("no training examples to fit the preconditioner on")
    if not damping_relative > 0:
        raise ValueError(f"damping_relative must be positive, got {damping_relative}")
    layers = lora_layers(model) if layers is None else layers
    input_cov: dict[str, torch.Tensor] = {}
    output_cov: dict[str, torch.Tensor] = {}
    tokens = 0
    for mask, captured in _batches(model, tokenizer, pairs, max_length, batch_size, layers):
        keep = mask.bool()
        tokens += int(keep.sum())
        for name, (x, g) in captured.items():
            x, g = x[keep], g[keep]
            input_cov[name] = input_cov.get(name, 0) + x.T @ x
            output_cov[name] = output_cov.get(name, 0) + g.T @ g
    bases = {}
    for name, _ in layers:
        _, q_in = torch.linalg.eigh(input_cov[name] / tokens)
        _, q_out = torch.linalg.eigh(output_cov[name] / tokens)
        bases[name] = (q_in, q_out)
    corrected: dict[str, torch.Tensor] = {}
    for _, captured in _batches(model, tokenizer, pairs, max_length, batch_size, layers):
        for name, (x, g) in captured.items():
            q_in, q_out = bases[name]
            rotated = q_out.T @ _example_gradients(x, g) @ q_in
            corrected[name] = corrected.get(name, 0) + (rotated**2).sum(dim=0)
    factors = {}
    for name, (q_in, q_out) in bases.items():
        eigenvalues = corrected[name] / len(pairs)
        damping = damping_relative * float(eigenvalues.mean())
        if damping <= 0:  # a layer with zero gradient everywhere: identity preconditioner
            damping = 1.0
        factors[name] = LayerFactors(q_in, q_out, eigenvalues + damping)
    return factors


def projected_hessian(projector: AnyProjector, factors: dict[str, LayerFactors]) -> np.ndarray:
    """R F R^T [k, k] float64, F the damped EK-FAC matrix of `factors` and R `projector`'s
    matrix."""
    k = projector.k
    total = torch.zeros(k, k, dtype=torch.float64)
    for name, shape in projector.layout:
        f = factors[name]
        q_out, q_in = f.output_basis.float(), f.input_basis.float()
        eigenvalues = f.eigenvalues.reshape(-1)
        for start in range(0, eigenvalues.numel(), EIGENVECTOR_BATCH):
            index = torch.arange(start, min(start + EIGENVECTOR_BATCH, eigenvalues.numel()))
            # Eigenvector (o, i) of the layer's H is the matrix Q_G[:, o] Q_A[:, i]^T.
            out_vectors = q_out[:, index // shape[1]].T  # [c, out]
            in_vectors = q_in[:, index % shape[1]].T  # [c, in]
            vectors = out_vectors[:, :, None] * in_vectors[:, None, :]
            projected = projector.project_parameter(name, vectors.to(projector.device))
            projected = projected.cpu().double()
            total += projected.T @ (projected * eigenvalues[index, None])
    return ((total + total.T) / 2).numpy()


def query_like_pairs(texts: Sequence[str]) -> list[tuple[str, str]]:
    """(prompt, completion) pairs shaped like the queries the index scores: each text split
    at the word boundaries after QUERY_SPLITS of its words (a one-word text stays whole)."""
    pairs = []
    for text in texts:
        words = text.split(" ")
        cuts = sorted({min(len(words) - 1, max(1, int(len(words) * f))) for f in QUERY_SPLITS})
        if len(words) < 2:
            pairs.append(("", text))
            continue
        pairs += [(" ".join(words[:cut]), " " + " ".join(words[cut:])) for cut in cuts]
    return pairs


def _apply(factors: LayerFactors, gradients: torch.Tensor, power: int) -> torch.Tensor:
    """H^power applied to each [out, in] matrix of `gradients` [B, out, in]."""
    q_out, q_in = factors.output_basis, factors.input_basis
    rotated = q_out.T @ gradients @ q_in
    return q_out @ (rotated * factors.eigenvalues**power) @ q_in.T


def ekfac_projected_features(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    projector: AnyProjector,
    max_length: int,
    batch_size: int = 32,
    damping_relative: float = DEFAULT_DAMPING_RELATIVE,
    prior_damping_relative: float = DEFAULT_PRIOR_DAMPING_RELATIVE,
    layers: Layers | None = None,
) -> np.ndarray:
    """[N, k] float32 rows w_i = (R S R^T)^-1 R S H^-1 g_i of the training texts (see the
    module docstring)."""
    layers = lora_layers(model) if layers is None else layers
    pairs = [("", text) for text in texts]
    hessian = fit_factors(model, tokenizer, pairs, max_length, batch_size, damping_relative, layers)
    prior = fit_factors(
        model, tokenizer, query_like_pairs(texts), max_length, batch_size,
        prior_damping_relative, layers,
    )  # fmt: skip
    rows = []
    for _, captured in _batches(model, tokenizer, pairs, max_length, batch_size, layers):
        preconditioned = {
            name: _apply(prior[name], _apply(hessian[name], _example_gradients(x, g), -1), 1)
            for name, (x, g) in captured.items()
        }
        rows.append(projector.project(preconditioned).cpu().double())
    return solve_projected(projected_hessian(projector, prior), torch.cat(rows).numpy())


def solve_projected(hessian: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """[N, k] float32: (R S R^T)^-1 b_i for each row b_i of `rows` [N, k]."""
    k = hessian.shape[0]
    ridge = SOLVE_RIDGE_RELATIVE * float(np.trace(hessian)) / k
    solved = np.linalg.solve(hessian + ridge * np.eye(k), rows.astype(np.float64).T).T
    return solved.astype(np.float32)
