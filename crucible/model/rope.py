"""Rotary position embeddings in the rotate-half layout used by Hugging Face Llama, with scaling.

The head dimension is split into two halves [x1, x2] rather than interleaved pairs, so weights
exported to (or imported from) transformers need no permutation of the q/k projections.

RoPE scaling (`model.rope_scaling`) follows transformers' definitions exactly, op for op in fp32,
so logits agree with an exported model at any position:

* linear: every inverse frequency divided by `factor` (position interpolation).
* dynamic (NTK): beyond the original length L0, the base becomes
  theta * (factor * n / L0 - (factor - 1)) ** (d / (d - 2)), with n = the largest position id of
  the current forward pass + 1. Within L0 the plain frequencies are used. With a KV cache every
  new token recomputes the frequencies for its own length while the cached keys keep the rotation
  they were stored with; transformers does the same. (transformers additionally remembers the
  longest length seen since the last call shorter than L0 and keeps using it for shorter calls;
  here each forward pass depends only on its own positions. The two agree for any single
  prefill + decode sequence and for fresh models.)
* yarn: NTK-by-parts blend of interpolated and original frequencies (ramp between the
  dimensions that rotate beta_fast and beta_slow times over L0), and cos/sin multiplied by the
  attention factor (default 0.1 ln(factor) + 1), which scales attention logits by its square.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from crucible.config import RopeScalingConfig


def rope_inv_freq(head_dim: int, theta: float, device: torch.device | None = None) -> Tensor:
    """Inverse frequencies theta^(-2i/d) for i < d/2, in fp32."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim
    return 1.0 / (theta**exponents)


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn_inv_freq(
    head_dim: int,
    theta: float,
    rs: RopeScalingConfig,
    original_len: int,
    device: torch.device | None = None,
) -> tuple[Tensor, float]:
    """YaRN inverse frequencies and attention factor (Peng et al. 2023, section 3)."""
    dim, factor = head_dim, rs.factor
    attention_factor = rs.attention_factor
    if attention_factor is None:
        if rs.mscale and rs.mscale_all_dim:
            attention_factor = yarn_get_mscale(factor, rs.mscale) / yarn_get_mscale(
                factor, rs.mscale_all_dim
            )
        else:
            attention_factor = yarn_get_mscale(factor)
    beta_fast, beta_slow = rs.beta_fast or 32, rs.beta_slow or 1

    def correction_dim(rotations: float) -> float:
        # The dimension pair whose wavelength fits `rotations` times into original_len.
        return (dim * math.log(original_len / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rs.truncate is None or rs.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = theta ** (torch.arange(0, dim, 2).to(device=device, dtype=torch.float) / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep = 1 - ramp.to(device=device, dtype=torch.float)  # 1: original frequency, 0: interpolated
    return interpolation * (1 - keep) + extrapolation * keep, float(attention_factor)


def scaled_inv_freq(
    head_dim: int,
    theta: float,
    scaling: RopeScalingConfig | None,
    original_len: int,
    device: torch.device | None = None,
) -> tuple[Tensor, float]:
    """The static inverse frequencies and cos/sin multiplier for a scaling config.

    For dynamic scaling these are the plain frequencies, used up to the original length.
    """
    if scaling is None or scaling.type == "dynamic":
        return rope_inv_freq(head_dim, theta, device), 1.0
    if scaling.type == "linear":
        return rope_inv_freq(head_dim, theta, device) / scaling.factor, 1.0
    return yarn_inv_freq(head_dim, theta, scaling, original_len, device)


def dynamic_ntk_inv_freq(
    head_dim: int, theta: float, factor: float, original_len: int, seq_len: Tensor
) -> Tensor:
    """NTK-rescaled inverse frequencies for a sequence of `seq_len` (a 0-d integer tensor)."""
    dim = head_dim
    seq_len = seq_len.clamp(min=original_len)
    base = theta * ((factor * seq_len / original_len) - (factor - 1)) ** (dim / (dim - 2))
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=seq_len.device).float() / dim
    return 1.0 / (base**exponents)


class RotaryEmbedding(nn.Module):
    """Turns position ids [B, T] into (cos, sin) tables [B, T, head_dim], shared by all layers.
    With partial RoPE, `head_dim` is the rotated part (ModelConfig.rope_dim)."""

    def __init__(
        self,
        head_dim: int,
        theta: float,
        scaling: RopeScalingConfig | None = None,
        original_len: int | None = None,
    ) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta
        self.scaling = scaling
        self.original_len = original_len or 0
        inv_freq, self.attention_factor = scaled_inv_freq(
            head_dim, theta, scaling, self.original_len
        )
        # Not persistent: it is a function of the config, so it never belongs in a checkpoint.
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def reset_parameters(self, device: torch.device | None = None) -> None:
        """Recompute the buffer (on `device`, default its current one), e.g. after `to_empty()`."""
        device = device if device is not None else self.inv_freq.device
        self.inv_freq, _ = scaled_inv_freq(
            self.head_dim, self.theta, self.scaling, self.original_len, device=device
        )

    def _inv_freq(self, position_ids: Tensor) -> Tensor:
        if self.scaling is None or self.scaling.type != "dynamic":
            return self.inv_freq
        # Tensor ops only (no host sync): the plain table within the original length, else the
        # NTK table for this pass's length.
        seq_len = position_ids.max() + 1
        ntk = dynamic_ntk_inv_freq(
            self.head_dim, self.theta, self.scaling.factor, self.original_len, seq_len
        )
        return torch.where(seq_len > self.original_len, ntk, self.inv_freq)

    def forward(self, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        # fp32 throughout: positions in the thousands need more mantissa than bf16 has.
        freqs = position_ids[..., None].float() * self._inv_freq(position_ids).float()
        emb = torch.cat((freqs, freqs), dim=-1)
        if self.attention_factor != 1.0:
            return emb.cos() * self.attention_factor, emb.sin() * self.attention_factor
        return emb.cos(), emb.sin()


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x [B, H, T, head_dim] by the tables [B, T, rope_dim]; computed in fp32.

    Partial RoPE (rope_dim < head_dim): the first rope_dim dims rotate, the rest pass through."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    rot = cos.shape[-1]
    if rot < x.shape[-1]:
        return torch.cat([apply_rope_full(x[..., :rot], cos, sin), x[..., rot:]], dim=-1)
    return apply_rope_full(x, cos, sin)


def apply_rope_full(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    xf = x.float()
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)
