"""Merge algorithms on single tensors, following mergekit's definitions (arcee-ai/mergekit).

  linear           sum_i w_i T_i, divided by sum_i w_i when normalize (default true)
  model_soup       the uniform mean of the models (linear with equal weights)
  slerp            spherical interpolation between base (t = 0) and the other model (t = 1) over
                   the flattened tensor; falls back to lerp when |cos| > 0.9995
  task_arithmetic  base + lambda * sum_i w_i (T_i - base)        (normalize default false)
  ties             deltas trimmed to their top `density` by magnitude, weighted; a sign elected
                   per element (sign of the weighted sum); the deltas that agree averaged by their
                   weights (normalize default true)
  dare_linear      deltas dropped at random (keep probability `density`, seeded), rescaled to the
                   L1 norm of the full delta (rescale default true), then summed as task arithmetic
  dare_ties        the same random drop, then TIES' sign election and disjoint mean (normalize
                   default false, as in mergekit)
Computation is float32 (float64 when the inputs are float64); callers cast the result.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch
from torch import Tensor

SLERP_DOT_THRESHOLD = 0.9995

METHODS = ("linear", "model_soup", "slerp", "task_arithmetic", "ties", "dare_linear", "dare_ties")
NEEDS_BASE = {"slerp", "task_arithmetic", "ties", "dare_linear", "dare_ties"}
# mergekit's registry defaults: (sparsify, consensus, normalize, rescale)
_GTA = {
    "task_arithmetic": (None, False, False, False),
    "ties": ("magnitude", True, True, False),
    "dare_linear": ("random", False, False, True),
    "dare_ties": ("random", True, False, True),
}


@dataclass(frozen=True)
class Method:
    """One merge method with its resolved global parameters."""

    name: str
    normalize: bool | None = None  # None: the method's default
    rescale: bool | None = None
    lam: float = 1.0  # mergekit's `lambda`
    seed: int = 0

    def default_normalize(self) -> bool:
        if self.name in ("linear", "model_soup"):
            return True
        return _GTA[self.name][2] if self.name in _GTA else False

    def default_rescale(self) -> bool:
        return _GTA[self.name][3] if self.name in _GTA else False


def _work(t: Tensor) -> Tensor:
    return t.to(torch.float64 if t.dtype == torch.float64 else torch.float32)


def linear(tensors: list[Tensor], weights: list[float], normalize: bool = True) -> Tensor:
    out = torch.zeros_like(_work(tensors[0]))
    for t, w in zip(tensors, weights):
        out += w * _work(t)
    total = sum(weights)
    if normalize:
        if abs(total) < 1e-12:
            raise ValueError("linear merge with normalize: the weights sum to 0")
        out /= total
    return out


def slerp(t: float, v0: Tensor, v1: Tensor, eps: float = 1e-8) -> Tensor:
    """Spherical interpolation of the flattened tensors (t = 0 gives v0, t = 1 gives v1)."""
    a, b = _work(v0).reshape(-1), _work(v1).reshape(-1)
    na, nb = a.norm(), b.norm()
    na = na if na > eps else torch.ones_like(na)
    nb = nb if nb > eps else torch.ones_like(nb)
    dot = float(((a / na) * (b / nb)).sum().clamp(-1, 1))
    if abs(dot) > SLERP_DOT_THRESHOLD:
        out = (1 - t) * a + t * b
    else:
        theta = math.acos(dot)
        s = math.sin(theta)
        out = (math.sin((1 - t) * theta) / s) * a + (math.sin(t * theta) / s) * b
    return out.reshape(v0.shape)


def magnitude_mask(delta: Tensor, density: float) -> Tensor:
    """1 for the int(density * numel) largest |delta| (at least one), else 0."""
    if density >= 1:
        return torch.ones_like(delta)
    if density <= 0 or delta.numel() == 0:
        return torch.zeros_like(delta)
    k = max(1, int(density * delta.numel()))
    order = torch.argsort(delta.abs().reshape(-1).float(), descending=True, stable=True)
    mask = torch.zeros(delta.numel(), dtype=delta.dtype)
    mask[order[:k]] = 1
    return mask.reshape(delta.shape)


def random_mask(delta: Tensor, density: float, generator: torch.Generator) -> Tensor:
    """Bernoulli(density) keep-mask drawn from `generator` (DARE)."""
    if density >= 1:
        return torch.ones_like(delta)
    probs = torch.full(delta.shape, float(density), dtype=torch.float32)
    return torch.bernoulli(probs, generator=generator).to(delta.dtype)


def l1_rescaled(delta: Tensor, mask: Tensor, eps: float = 1e-7) -> Tensor:
    """delta * mask scaled so that its L1 norm equals delta's (mergekit's `rescale`)."""
    kept = delta * mask
    before, after = delta.abs().sum(), kept.abs().sum()
    if before < eps or after < eps:
        return kept
    return kept * (before / after)


def tensor_generator(seed: int, name: str, index: int) -> torch.Generator:
    """A generator per (seed, tensor, model): the drop pattern does not depend on the order."""
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}:{index}".encode()))


def task_arithmetic_family(
    method: Method,
    base: Tensor,
    tensors: list[Tensor],
    weights: list[float],
    densities: list[float],
    name: str = "",
) -> Tensor:
    """task_arithmetic, ties, dare_linear, dare_ties (mergekit's generalized task arithmetic)."""
    sparsify, consensus, _, _ = _GTA[method.name]
    normalize = method.default_normalize() if method.normalize is None else method.normalize
    rescale = method.default_rescale() if method.rescale is None else method.rescale
    b = _work(base)
    deltas = []
    for i, (t, d) in enumerate(zip(tensors, densities)):
        delta = _work(t) - b
        if sparsify == "magnitude":
            mask = magnitude_mask(delta, d)
        elif sparsify == "random":
            mask = random_mask(delta, d, tensor_generator(method.seed, name, i))
        else:
            mask = None
        if mask is not None:
            delta = l1_rescaled(delta, mask) if rescale else delta * mask
        deltas.append(delta)
    stacked = torch.stack(deltas)
    w = torch.tensor(weights, dtype=stacked.dtype).reshape(-1, *([1] * base.dim()))
    weighted = stacked * w
    if consensus:
        majority = torch.where(weighted.sum(0) >= 0, 1.0, -1.0).to(stacked.dtype)
        agree = (weighted.sign() == majority).to(stacked.dtype)
        mixed = (weighted * agree).sum(0)
        divisor = (w * agree).sum(0)
        divisor[divisor == 0] = 1
    else:
        mixed = weighted.sum(0)
        divisor = w.sum(0).expand_as(mixed).clone()
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed = mixed / divisor
    if method.lam != 1:
        mixed = mixed * method.lam
    return b + mixed
