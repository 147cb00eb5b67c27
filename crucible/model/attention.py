"""Grouped-query attention with optional QK-norm, per-layer RoPE, document masking and a KV cache.

One module covers MHA (num_kv_heads == num_heads), GQA and MQA (num_kv_heads == 1). The score
computation is delegated to fused kernels: `scaled_dot_product_attention` for the plain causal
case (flash / memory-efficient kernels on GPU) and, for intra-document masking on CUDA,
`flex_attention` with a block-sparse mask, falling back to SDPA with a dense boolean mask.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from crucible.config import ModelConfig
from crucible.model.autocast import autocast_input
from crucible.model.norm import RMSNorm
from crucible.model.rope import apply_rope

log = logging.getLogger(__name__)

try:  # flex_attention exists from torch 2.5; everything below degrades gracefully without it
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
except ImportError:  # pragma: no cover - depends on the torch build
    BlockMask = None  # type: ignore[assignment,misc]
    create_block_mask = flex_attention = None  # type: ignore[assignment]


# --------------------------------------------------------------------------- KV cache


class KVCache:
    """Per-layer key/value buffers for incremental decoding.

    Buffers of shape [B, num_kv_heads, max_len, head_dim] are allocated on the first write, with
    the dtype and device of the keys actually produced (which autocast decides). `length` is the
    number of positions already stored; the model advances it after each forward pass.
    Gated DeltaNet layers (hybrid models) store no keys: they keep their conv window `conv[i]`
    [B, channels, kernel - 1] and recurrent state `state[i]` [B, heads, Dk, Dv] instead.
    """

    def __init__(self, num_layers: int, batch_size: int, max_len: int) -> None:
        self.num_layers = num_layers
        self.batch_size = batch_size
        self.max_len = max_len
        self.length = 0
        self.k: list[Tensor | None] = [None] * num_layers
        self.v: list[Tensor | None] = [None] * num_layers
        self.conv: list[Tensor | None] = [None] * num_layers
        self.state: list[Tensor | None] = [None] * num_layers

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store k, v [B, Hkv, t, D] after the cached prefix; return all keys/values so far."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions > max_len {self.max_len}")
        if self.k[layer] is None:
            shape = (k.shape[0], k.shape[1], self.max_len, k.shape[3])
            self.k[layer] = k.new_zeros(shape)
            self.v[layer] = v.new_zeros(shape)
        ck, cv = self.k[layer], self.v[layer]
        assert ck is not None and cv is not None
        ck[:, :, start:end] = k
        cv[:, :, start:end] = v
        return ck[:, :, :end], cv[:, :, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def reset(self) -> None:
        self.length = 0
        self.conv = [None] * self.num_layers
        self.state = [None] * self.num_layers

    def fork(self, n: int) -> KVCache:
        """n copies of a one-row cache (e.g. several continuations of one prefilled prompt)."""
        if self.batch_size != 1:
            raise ValueError("only a single prefilled context can be forked")
        new = KVCache(self.num_layers, n, self.max_len)
        new.length = self.length

        def rep(ts: list[Tensor | None]) -> list[Tensor | None]:
            return [t.expand(n, *t.shape[1:]).clone() if t is not None else None for t in ts]

        new.k, new.v, new.conv, new.state = (
            rep(self.k),
            rep(self.v),
            rep(self.conv),
            rep(self.state),
        )
        return new


# --------------------------------------------------------------------------- masks


@dataclass
class AttentionMask:
    """How one forward pass masks attention; built once by the model and shared by all layers.

    Exactly one mode applies: `block_mask` (flex attention), `dense` (bool [B|1, 1, Tq, Tk],
    True where a query may attend a key), `causal` (queries and keys aligned, lower-triangular),
    or none of them (every query sees every key, e.g. one new token against a KV cache).
    """

    causal: bool = True
    dense: Tensor | None = None
    block_mask: Any = None  # torch.nn.attention.flex_attention.BlockMask


def positions_from_doc_ids(doc_ids: Tensor) -> Tensor:
    """Position ids [B, T] that restart at 0 wherever the document id changes."""
    T = doc_ids.shape[1]
    idx = torch.arange(T, device=doc_ids.device).expand_as(doc_ids)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    # Index of the most recent document start at or before each token.
    last_start = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - last_start


def dense_doc_mask(doc_ids: Tensor) -> Tensor:
    """Block-diagonal causal mask [B, 1, T, T]: same document and not in the future."""
    T = doc_ids.shape[1]
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    return (same_doc & causal).unsqueeze(1)


def offset_causal_mask(q_len: int, past: int, device: torch.device) -> Tensor:
    """Causal mask [1, 1, q_len, past + q_len] for queries that follow `past` cached tokens."""
    q_pos = torch.arange(q_len, device=device)[:, None] + past
    k_pos = torch.arange(past + q_len, device=device)[None, :]
    return (k_pos <= q_pos)[None, None]


_compiled: dict[str, Any] = {}
_flex_ok: dict[tuple, bool] = {}


def _flex() -> Any:
    # Uncompiled flex_attention materialises the full score matrix; compiled it is a fused kernel.
    if "flex" not in _compiled:
        _compiled["flex"] = torch.compile(flex_attention)
    return _compiled["flex"]


def _block_mask(doc_ids: Tensor) -> Any:
    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return (doc_ids[b, q_idx] == doc_ids[b, kv_idx]) & (kv_idx <= q_idx)

    # Compiled, because eager create_block_mask evaluates mask_mod over all T x T pairs.
    if "block_mask" not in _compiled:
        _compiled["block_mask"] = torch.compile(create_block_mask)
    B, T = doc_ids.shape
    return _compiled["block_mask"](mask_mod, B, None, T, T, device=doc_ids.device)


def _flex_works(device: torch.device, heads: int, kv_heads: int, head_dim: int, dtype) -> bool:
    """Run flex attention once on small inputs of this shape family and compare with SDPA.

    Flex attention needs Triton and a GPU it supports, and may reject some head dims; rather
    than enumerate the rules, try it once per (device, shape, dtype) and remember the answer.
    """
    key = (str(device), heads, kv_heads, head_dim, dtype)
    if key not in _flex_ok:
        try:
            gen = torch.Generator(device=device).manual_seed(0)
            T = 200  # deliberately not a multiple of the 128-token block size

            def rand(h: int) -> Tensor:
                return torch.randn(1, h, T, head_dim, device=device, dtype=dtype, generator=gen)

            q, k, v = rand(heads), rand(kv_heads), rand(kv_heads)
            doc_ids = (torch.arange(T, device=device) >= 70).long()[None]
            out = _flex()(q, k, v, block_mask=_block_mask(doc_ids), enable_gqa=heads != kv_heads)
            ref = _sdpa(q, k, v, AttentionMask(causal=False, dense=dense_doc_mask(doc_ids)))
            ok = bool(torch.allclose(out.float(), ref.float(), atol=2e-2, rtol=2e-2))
            if not ok:
                warnings.warn("flex_attention disagrees with SDPA; using SDPA", stacklevel=2)
        except Exception as e:  # any failure (no Triton, unsupported GPU/shape) means: don't use it
            log.info("flex_attention unavailable, using SDPA with a dense mask: %s", e)
            ok = False
        _flex_ok[key] = ok
    return _flex_ok[key]


@torch.compiler.disable
def doc_attention_mask(
    doc_ids: Tensor, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype
) -> AttentionMask:
    """The intra-document mask for doc_ids [B, T]: block-sparse for flex on CUDA, else dense.

    Kept out of torch.compile graphs: mask construction is cheap and done once per forward pass.
    """
    device = doc_ids.device
    if (
        device.type == "cuda"
        and flex_attention is not None
        and _flex_works(device, heads, kv_heads, head_dim, dtype)
    ):
        return AttentionMask(causal=False, block_mask=_block_mask(doc_ids))
    return AttentionMask(causal=False, dense=dense_doc_mask(doc_ids))


# --------------------------------------------------------------------------- attention


def _sdpa(q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask) -> Tensor:
    """q [B, H, Tq, D], k/v [B, Hkv, Tk, D] -> [B, H, Tq, D]."""
    # is_causal aligns the triangle to the top-left, which is only right for Tq == Tk.
    causal = mask.dense is None and mask.causal and q.shape[2] == k.shape[2] and q.shape[2] > 1
    if (
        k.shape[1] != q.shape[1]
        and mask.dense is None
        and (q.device.type == "cpu" or (q.is_cuda and q.dtype != torch.float32))
    ):
        # The flash kernels (CUDA bf16/fp16, and CPU in any dtype) share kv heads across query
        # groups natively: no repeated k/v, and on CPU 10-25% faster attention fwd+bwd at tiny's
        # shape (docs/benchmarks.md, "CPU speedrun").
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    if k.shape[1] != q.shape[1]:
        # Elsewhere repeat the kv heads: the memory-efficient kernel (and fp32 inputs on CUDA,
        # which flash rejects) would otherwise fall back to the slow math path.
        rep = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
    if mask.dense is not None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def attend(q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask) -> Tensor:
    if mask.block_mask is not None:
        return _flex()(q, k, v, block_mask=mask.block_mask, enable_gqa=q.shape[1] != k.shape[1])
    return _sdpa(q, k, v, mask)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.dim_per_head
        self.use_rope = cfg.uses_rope(layer_idx)
        d, q_out, kv_out = (
            cfg.hidden_size,
            cfg.num_heads * self.head_dim,
            cfg.num_kv_heads * self.head_dim,
        )
        bias = cfg.attention_bias
        # Gated attention (Qwen3-Next): q_proj emits [query, gate] per head, the gate scales the
        # attention output elementwise through a sigmoid before o_proj.
        self.output_gate = cfg.attn_output_gate
        self.q_proj = nn.Linear(d, q_out * (2 if self.output_gate else 1), bias=bias)
        self.k_proj = nn.Linear(d, kv_out, bias=bias)
        self.v_proj = nn.Linear(d, kv_out, bias=bias)
        self.o_proj = nn.Linear(q_out, d, bias=bias)
        # QK-norm (Qwen3 style): RMSNorm over each head's vector, before RoPE. It bounds the
        # attention logits, which keeps high learning rates from blowing up the softmax.
        self.q_norm = RMSNorm(self.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.norm_eps) if cfg.qk_norm else None

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: AttentionMask,
        cache: KVCache | None = None,
    ) -> Tensor:
        B, T, _ = x.shape
        x = autocast_input(x)  # q, k and v read it: one cast, not three
        gate = None
        if self.output_gate:
            q, gate = self.q_proj(x).view(B, T, self.num_heads, 2 * self.head_dim).chunk(2, -1)
            gate = gate.reshape(B, T, self.num_heads * self.head_dim)
        else:
            q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        # The norm computes in fp32 and may promote; attention wants one dtype for q, k, v.
        q, k = q.to(v.dtype), k.to(v.dtype)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, T, D]
        if self.use_rope:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        out = attend(q, k, v, mask).transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim)
        if gate is not None:
            out = out * torch.sigmoid(gate)
        return self.o_proj(out)
