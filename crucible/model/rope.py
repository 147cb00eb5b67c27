"""Rotary position embeddings in the rotate-half layout used by Hugging Face Llama.

The head dimension is split into two halves [x1, x2] rather than interleaved pairs, so weights
exported to (or imported from) transformers need no permutation of the q/k projections.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def rope_inv_freq(head_dim: int, theta: float, device: torch.device | None = None) -> Tensor:
    """Inverse frequencies theta^(-2i/d) for i < d/2, in fp32."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim
    return 1.0 / (theta**exponents)


class RotaryEmbedding(nn.Module):
    """Turns position ids [B, T] into (cos, sin) tables [B, T, head_dim], shared by all layers."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta
        # Not persistent: it is a function of the config, so it never belongs in a checkpoint.
        self.register_buffer("inv_freq", rope_inv_freq(head_dim, theta), persistent=False)

    def reset_parameters(self, device: torch.device | None = None) -> None:
        """Recompute the buffer (on `device`, default its current one), e.g. after `to_empty()`."""
        device = device if device is not None else self.inv_freq.device
        self.inv_freq = rope_inv_freq(self.head_dim, self.theta, device=device)

    def forward(self, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        # fp32 throughout: positions in the thousands need more mantissa than bf16 has.
        freqs = position_ids[..., None].float() * self.inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x [B, H, T, head_dim] by the tables [B, T, head_dim]; computed in fp32."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    xf = x.float()
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)
