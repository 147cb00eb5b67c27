"""RMSNorm with the same numerics as Hugging Face's LlamaRMSNorm."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class RMSNorm(nn.Module):
    """Scale by the reciprocal root-mean-square over the last dimension, then by a learned gain.

    The statistics are computed in fp32 even for bf16 inputs (a bf16 mean of squares loses too
    much precision), and the normalised value is cast back before the gain multiplies it, exactly
    as LlamaRMSNorm does, so exported weights reproduce the same activations in transformers.
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
