"""Gated DeltaNet: the linear-attention token mixer of Qwen3-Next (Yang et al., 2024).

Each value head keeps a state S [key_head_dim, value_head_dim]. Token t first decays it by
a_t = exp(g_t), then writes with the delta rule, replacing what S predicted for k_t by v_t at
rate beta_t, and reads it with q_t:

    S_t = a_t S_{t-1} + k_t beta_t (v_t - a_t S_{t-1}^T k_t)^T,    o_t = S_t^T q_t

with q, k L2-normalised (q also scaled by key_head_dim^-1/2), beta = sigmoid(b) and
g = -exp(A_log) softplus(a + dt_bias). Before that, q, k and v pass a causal depthwise conv
(width `conv_kernel`) and SiLU; after it, a gated RMSNorm (norm(o) * silu(z)) and out_proj.

Training runs `chunk_gated_delta_rule`: within a chunk of C tokens the recurrence is a
triangular system solved with matmuls (the WY / UT form), and only the C-times-shorter loop over
chunks is sequential. Generation carries (conv window, S) per layer in the KVCache, so decoding
one token costs the same at any position. Packed documents (doc_ids) reset S and the conv window
at every document start, so nothing leaks across documents.

Parameter names and layouts equal transformers' Qwen3NextGatedDeltaNet (in_proj_qkvz grouped by
key head, in_proj_ba, conv1d, dt_bias, A_log, norm, out_proj), so export renames nothing.
On CUDA, when `flash-linear-attention` (`fla`) imports, its Triton kernels replace the chunked
loop (linear_attention.kernels); that path is written against fla's documented API but has not
been run here.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from crucible.config import ModelConfig
from crucible.model.norm import RMSNorm

if TYPE_CHECKING:
    from crucible.model.attention import KVCache

log = logging.getLogger(__name__)

try:  # optional GPU kernels; nothing here needs them
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule as _fla_chunk
except Exception:  # pragma: no cover - fla is not installed in the test environment
    _fla_chunk = None


def _up(x: Tensor) -> Tensor:
    """At least fp32 (fp64 stays fp64, for references)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def l2norm(x: Tensor, eps: float = 1e-6) -> Tensor:
    """x / sqrt(sum x^2 + eps) over the last dim (fla's and transformers' definition)."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def _segments(starts: Tensor, n_chunks: int, chunk: int) -> tuple[Tensor, Tensor, Tensor]:
    """Masks from document starts [B, T'] (T' padded to n_chunks * chunk), each [B, 1, N, ...]:
    same [N, C, C] (two positions of a chunk lie in one document), first [N, C] (a position still
    belongs to the document the chunk started in, so it reads the carried state) and last [N, C]
    (a position belongs to the chunk's last document, so its write survives into the next
    chunk's state)."""
    seg = starts.view(starts.shape[0], 1, n_chunks, chunk).long().cumsum(-1)
    same = seg.unsqueeze(-1) == seg.unsqueeze(-2)
    return same, seg == 0, seg == seg[..., -1:]


def chunk_gated_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    chunk_size: int = 64,
    initial_state: Tensor | None = None,
    starts: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The gated delta rule over q, k [B, T, H, Dk] (normalised and scaled), v [B, T, H, Dv],
    log-decays g and rates beta [B, T, H]; starts [B, T] (bool, optional) marks document starts,
    where the state is reset. Returns (o [B, T, H, Dv] in v's dtype, final state [B, H, Dk, Dv]
    in fp32, or fp64 for fp64 inputs). Computed in fp32 (fp64 inputs stay fp64) with autocast
    off: the state accumulates over the whole sequence, and the triangular solves want fp32.
    """
    with torch.autocast(q.device.type, enabled=False):
        return _chunk_rule(q, k, v, g, beta, chunk_size, initial_state, starts)


def _chunk_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    chunk_size: int = 64,
    initial_state: Tensor | None = None,
    starts: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    dtype = v.dtype
    work = torch.promote_types(dtype, torch.float32)
    B, T, H, Dk = k.shape
    Dv = v.shape[-1]
    C = min(chunk_size, T)
    pad = (C - T % C) % C
    # [B, H, T, D] fp32, padded with tokens that write nothing (k = v = beta = 0) and keep the
    # state (g = 0).
    q, k, v = (F.pad(x.transpose(1, 2).to(work), (0, 0, 0, pad)) for x in (q, k, v))
    g, beta = (F.pad(x.transpose(1, 2).to(work), (0, pad)) for x in (g, beta))
    N = (T + pad) // C
    q, k, v = (x.reshape(B, H, N, C, x.shape[-1]) for x in (q, k, v))
    g, beta = g.reshape(B, H, N, C), beta.reshape(B, H, N, C)

    cum = g.cumsum(-1)  # log of the decay from the chunk start through each position
    lower = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    # decay[i, j] = a_{j+1} ... a_i for j <= i, else 0
    decay = (cum.unsqueeze(-1) - cum.unsqueeze(-2)).masked_fill(~lower, float("-inf")).exp()
    gamma = cum.exp()  # decay from the chunk start
    to_end = (cum[..., -1:] - cum).exp()  # decay from each position to the chunk end
    chunk_decay = gamma[..., -1]
    if starts is not None:
        same, first, last = _segments(F.pad(starts, (0, pad)), N, C)
        decay = decay * same
        gamma, to_end = gamma * first, to_end * last
        chunk_decay = chunk_decay * first[..., -1]

    kb = k * beta.unsqueeze(-1)
    # (I + A) U = V beta - (K beta gamma) S_0, A[i, j] = beta_i (k_i . k_j) decay[i, j], j < i.
    system = (kb @ k.transpose(-1, -2)) * decay
    rhs = torch.cat([v * beta.unsqueeze(-1), kb * gamma.unsqueeze(-1)], dim=-1)  # one solve
    u0, w = torch.linalg.solve_triangular(system, rhs, upper=False, unitriangular=True).split(
        [Dv, Dk], dim=-1
    )
    intra = (q @ k.transpose(-1, -2)) * decay  # includes the diagonal: o_t reads its own write
    q_state = q * gamma.unsqueeze(-1)
    k_end = k * to_end.unsqueeze(-1)

    if initial_state is None:
        state = q.new_zeros(B, H, Dk, Dv)
    else:
        state = initial_state.to(work)
    outs = []
    for n in range(N):
        u = u0[:, :, n] - w[:, :, n] @ state
        outs.append(q_state[:, :, n] @ state + intra[:, :, n] @ u)
        state = state * chunk_decay[:, :, n, None, None] + k_end[:, :, n].transpose(-1, -2) @ u
    o = torch.stack(outs, dim=2).reshape(B, H, N * C, Dv)[:, :, :T]
    return o.transpose(1, 2).to(dtype), state


def _fla_gated_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    initial_state: Tensor | None,
    starts: Tensor | None,
) -> tuple[Tensor, Tensor]:  # pragma: no cover - needs CUDA and fla
    """fla's fused chunk kernel; packed documents become varlen sequences (cu_seqlens)."""
    assert _fla_chunk is not None
    if starts is None:
        o, s = _fla_chunk(
            q,
            k,
            v,
            g=g,
            beta=beta,
            scale=1.0,
            initial_state=initial_state,
            output_final_state=True,
        )
        return o, s
    B, T = starts.shape
    flat = starts.clone()
    flat[:, 0] = True  # every row starts a sequence
    cu = torch.cat([flat.flatten().nonzero().flatten(), flat.new_tensor([B * T]).long()])
    o, s = _fla_chunk(
        *(x.reshape(1, B * T, *x.shape[2:]) for x in (q, k, v, g, beta)),
        scale=1.0,
        output_final_state=True,
        cu_seqlens=cu.to(torch.int32),
    )
    return o.view(B, T, *o.shape[2:]), s[-B:]  # unused: doc masking refuses a cache


class GatedRMSNorm(RMSNorm):
    """RMSNorm of each head's output, times silu(z) (transformers' Qwen3NextRMSNormGated)."""

    def forward(self, x: Tensor, z: Tensor) -> Tensor:  # type: ignore[override]
        return (super().forward(x) * F.silu(_up(z))).to(x.dtype)


class GatedDeltaNet(nn.Module):
    """One linear-attention layer (the token mixer of a `linear` layer in the pattern)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        la = cfg.linear_attention
        assert la is not None
        self.layer_idx = layer_idx
        self.hk, self.hv = la.num_key_heads, la.num_value_heads
        self.dk, self.dv = la.key_head_dim, la.value_head_dim
        self.chunk_size, self.kernels = la.chunk_size, la.kernels
        if la.kernels == "fla" and _fla_chunk is None:
            from crucible.config import ConfigError

            raise ConfigError(
                "model.linear_attention.kernels=fla needs the flash-linear-attention package "
                "(import fla failed); use auto or torch"
            )
        self.key_dim, self.value_dim = self.hk * self.dk, self.hv * self.dv
        self.conv_dim = 2 * self.key_dim + self.value_dim
        d = cfg.hidden_size
        self.in_proj_qkvz = nn.Linear(d, 2 * self.key_dim + 2 * self.value_dim, bias=False)
        self.in_proj_ba = nn.Linear(d, 2 * self.hv, bias=False)
        self.conv1d = nn.Conv1d(
            self.conv_dim,
            self.conv_dim,
            la.conv_kernel,
            groups=self.conv_dim,
            bias=False,
            padding=la.conv_kernel - 1,  # unused (we pad ourselves); transformers' layout
        )
        self.dt_bias = nn.Parameter(torch.ones(self.hv))
        self.A_log = nn.Parameter(torch.zeros(self.hv))
        self.norm = GatedRMSNorm(self.dv, cfg.norm_eps)
        self.out_proj = nn.Linear(self.value_dim, d, bias=False)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The non-Linear parameters, initialised as transformers does: dt_bias 1, A uniform in
        [0.01, 16] (so decay rates span slow to fast across heads), PyTorch's conv default."""
        self.conv1d.reset_parameters()
        nn.init.ones_(self.dt_bias)
        self.A_log.copy_(torch.empty_like(self.A_log).uniform_(0.01, 16).log())
        self.norm.reset_parameters()

    def _split(self, qkvz: Tensor, ba: Tensor) -> tuple[Tensor, ...]:
        """transformers' fix_query_key_value_ordering: projections are grouped by key head."""
        B, T, _ = qkvz.shape
        r = self.hv // self.hk
        qkvz = qkvz.view(B, T, self.hk, 2 * self.dk + 2 * r * self.dv)
        q, k, v, z = qkvz.split([self.dk, self.dk, r * self.dv, r * self.dv], dim=-1)
        b, a = ba.view(B, T, self.hk, 2 * r).split([r, r], dim=-1)
        v, z = v.reshape(B, T, self.hv, self.dv), z.reshape(B, T, self.hv, self.dv)
        return q, k, v, z, b.reshape(B, T, self.hv), a.reshape(B, T, self.hv)

    def _conv(self, x: Tensor, cache: KVCache | None, starts: Tensor | None) -> Tensor:
        """Causal depthwise conv + SiLU over x [B, C, T]; the window continues the cache's."""
        K = self.conv1d.kernel_size[0]
        w = self.conv1d.weight  # [C, 1, K]
        prev = cache.conv[self.layer_idx] if cache is not None else None
        if prev is None:
            prev = x.new_zeros(x.shape[0], x.shape[1], K - 1)
        xin = torch.cat([prev.to(x.dtype), x], dim=-1)
        if cache is not None:
            cache.conv[self.layer_idx] = xin[:, :, xin.shape[-1] - (K - 1) :].detach()
        if starts is None:
            out = F.conv1d(xin, w.to(x.dtype), groups=x.shape[1])
        else:  # taps from an earlier document read zero
            T = x.shape[-1]
            seg = starts.long().cumsum(-1)  # document index within the row
            seg = torch.cat([seg.new_full((seg.shape[0], K - 1), -1), seg], dim=-1)
            out = 0
            for j in range(K):  # tap j reads x_{t-j}
                keep = (seg[:, K - 1 - j : K - 1 - j + T] == seg[:, K - 1 :]).unsqueeze(1)
                out = out + w[:, 0, K - 1 - j, None] * xin[:, :, K - 1 - j : K - 1 - j + T] * keep
        return F.silu(out)

    def forward(
        self, x: Tensor, cache: KVCache | None = None, starts: Tensor | None = None
    ) -> Tensor:
        """x [B, T, hidden]; starts [B, T] bool marks document starts (packed training)."""
        B, T, _ = x.shape
        q, k, v, z, b, a = self._split(self.in_proj_qkvz(x), self.in_proj_ba(x))
        mixed = torch.cat([q.reshape(B, T, -1), k.reshape(B, T, -1), v.reshape(B, T, -1)], -1)
        mixed = self._conv(mixed.transpose(1, 2), cache, starts).transpose(1, 2)
        q, k, v = mixed.split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        q = l2norm(_up(q.reshape(B, T, self.hk, self.dk))) * self.dk**-0.5
        k = l2norm(_up(k.reshape(B, T, self.hk, self.dk)))
        v = v.reshape(B, T, self.hv, self.dv)
        if self.hv != self.hk:  # each key head serves hv / hk consecutive value heads
            q = q.repeat_interleave(self.hv // self.hk, dim=2)
            k = k.repeat_interleave(self.hv // self.hk, dim=2)
        beta = _up(b).sigmoid()
        g = -_up(self.A_log).exp() * F.softplus(_up(a) + _up(self.dt_bias))
        state = cache.state[self.layer_idx] if cache is not None else None
        if self._use_fla(x):  # pragma: no cover - needs CUDA and fla
            o, new_state = _fla_gated_delta_rule(
                q.to(v.dtype), k.to(v.dtype), v, g, beta.to(v.dtype), state, starts
            )
        else:
            o, new_state = chunk_gated_delta_rule(q, k, v, g, beta, self.chunk_size, state, starts)
        if cache is not None:
            cache.state[self.layer_idx] = new_state.detach()
        o = self.norm(o, z)
        return self.out_proj(o.reshape(B, T, self.value_dim))

    def _use_fla(self, x: Tensor) -> bool:
        if self.kernels == "torch":
            return False
        if self.kernels == "fla" and not x.is_cuda:
            raise RuntimeError(
                "model.linear_attention.kernels=fla needs CUDA (fla's kernels are Triton); "
                "use auto or torch"
            )
        return _fla_chunk is not None and x.is_cuda
