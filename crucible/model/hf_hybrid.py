"""The Qwen3-Next side of the transformers export/import (see crucible/model/hf.py).

"qwen3_next" (Qwen3NextForCausalLM) represents a model with Gated DeltaNet layers
(`model.linear_attention`) or gated attention (`model.attn_output_gate`). The mapping:

  * layer kinds: `linear_attention.pattern` repeated over the depth -> `layer_types`
    ("linear_attention" / "full_attention"); on import the shortest repeating period of
    `layer_types` becomes the pattern.
  * linear layers: num_key_heads, num_value_heads, key_head_dim, value_head_dim, conv_kernel ->
    linear_num_key_heads, linear_num_value_heads, linear_key_head_dim, linear_value_head_dim,
    linear_conv_kernel_dim. Our GatedDeltaNet uses transformers' parameter names and layouts.
    chunk_size and kernels (no counterpart) travel in "crucible_linear_attention".
  * full-attention layers: Qwen3-Next always has QK-norm and the sigmoid output gate, so both
    must be on (qk_norm, attn_output_gate); q_proj already has its [query, gate]-per-head layout.
  * RoPE: partial_rotary_factor both ways (Qwen3-Next's default and published value is 0.25,
    ours 1.0: both work; RoPE rotates the first int(head_dim * factor) dims in both).
  * MLP: dense SwiGLU in every layer (num_experts 0, every layer in mlp_only_layers). Qwen3-Next's
    MoE has a sigmoid-gated shared expert that our MoE lacks, so MoE hybrids are not exported
    and MoE checkpoints are refused.
  * norms: Qwen3-Next's RMSNorm scales by (1 + weight) (zero-centred); ours by weight. Exported
    block, final and QK norm weights are ours - 1, imported ones + 1. (The gated norm inside a
    linear layer scales by weight, as ours does, and is copied.)
"""

from __future__ import annotations

import re
from typing import Any

from torch import Tensor

from crucible.config import LinearAttentionConfig, ModelConfig

HYBRID_ARCHS = {"qwen3_next": "Qwen3NextForCausalLM"}

_KINDS = {"linear": "linear_attention", "full": "full_attention"}
_LOCAL = ("chunk_size", "kernels")
# Norms that transformers' Qwen3NextRMSNorm scales by (1 + weight).
_ZERO_CENTRED = re.compile(
    r"^(norm|layers\.\d+\.(input_layernorm|post_attention_layernorm|self_attn\.[qk]_norm))\.weight$"
)


def is_hybrid(cfg: ModelConfig) -> bool:
    return cfg.linear_attention is not None or cfg.attn_output_gate


def check_hybrid_export(cfg: ModelConfig, all_rope: bool) -> str:
    """'qwen3_next', or ValueError naming what Qwen3-Next cannot represent."""
    lacks = [
        ("QK-norm off (set model.qk_norm=true)", not cfg.qk_norm),
        ("ungated attention (set model.attn_output_gate=true)", not cfg.attn_output_gate),
        ("mixture-of-experts MLPs of our kind (its MoE has a gated shared expert)", cfg.moe),
        ("NoPE layers", not all_rope),
    ]
    missing = [what for what, bad in lacks if bad]
    if missing:
        raise ValueError(
            "cannot export this model to transformers' Qwen3-Next, which has no "
            + ", no ".join(missing)
        )
    return "qwen3_next"


def hybrid_hf_config(cfg: ModelConfig, d: dict[str, Any]) -> None:
    """Add the Qwen3-Next fields to the config.json dict `d` (in place)."""
    la = cfg.linear_attention or LinearAttentionConfig(pattern=["full"])
    d["layer_types"] = [_KINDS[la.pattern[i % len(la.pattern)]] for i in range(cfg.num_layers)]
    factor = cfg.partial_rotary_factor
    d["rope_parameters"] = {**d["rope_parameters"], "partial_rotary_factor": factor}
    d["partial_rotary_factor"] = factor
    for key in ("use_sliding_window", "sliding_window", "max_window_layers"):
        d.pop(key, None)
    d.update(
        linear_num_key_heads=la.num_key_heads,
        linear_num_value_heads=la.num_value_heads,
        linear_key_head_dim=la.key_head_dim,
        linear_value_head_dim=la.value_head_dim,
        linear_conv_kernel_dim=la.conv_kernel,
        num_experts=0,
        num_experts_per_tok=1,
        decoder_sparse_step=1,
        mlp_only_layers=list(range(cfg.num_layers)),
        moe_intermediate_size=cfg.intermediate_size,
        shared_expert_intermediate_size=cfg.intermediate_size,
        output_router_logits=False,
    )
    if cfg.linear_attention is not None:
        d["crucible_linear_attention"] = {k: getattr(la, k) for k in _LOCAL}


def _period(kinds: list[str]) -> list[str]:
    n = len(kinds)
    for p in range(1, n + 1):
        if n % p == 0 and kinds == kinds[:p] * (n // p):
            return kinds[:p]
    return kinds  # pragma: no cover - p = n always matches


def hybrid_config_from_hf(hc: Any, ours: dict | None) -> dict[str, Any]:
    """ModelConfig fields (qk_norm, attn_output_gate, partial_rotary_factor, linear_attention)
    from a transformers
    Qwen3NextConfig; ValueError for what we cannot represent."""

    def unsupported(what: str) -> ValueError:
        return ValueError(f"cannot load qwen3_next checkpoint: {what} is not supported")

    rope = getattr(hc, "rope_parameters", None) or {}
    factor = rope.get("partial_rotary_factor", getattr(hc, "partial_rotary_factor", 1.0))
    L = hc.num_hidden_layers
    sparse = [
        i
        for i in range(L)
        if i not in hc.mlp_only_layers
        and hc.num_experts > 0
        and (i + 1) % hc.decoder_sparse_step == 0
    ]
    if sparse:
        raise unsupported(f"mixture-of-experts MLPs (layers {sparse[:4]}...)")
    kinds = ["linear" if t == "linear_attention" else "full" for t in hc.layer_types[:L]]
    la = None
    if "linear" in kinds:
        la = LinearAttentionConfig(
            pattern=_period(kinds),
            num_key_heads=hc.linear_num_key_heads,
            num_value_heads=hc.linear_num_value_heads,
            key_head_dim=hc.linear_key_head_dim,
            value_head_dim=hc.linear_value_head_dim,
            conv_kernel=hc.linear_conv_kernel_dim,
            **(ours or {}),
        )
    return dict(
        qk_norm=True, attn_output_gate=True, partial_rotary_factor=factor, linear_attention=la
    )


def hybrid_to_hf_tensor(name: str, t: Tensor) -> Tensor:
    return t - 1 if _ZERO_CENTRED.match(name) else t


def hybrid_from_hf_tensor(name: str, t: Tensor) -> Tensor:
    return t + 1 if _ZERO_CENTRED.match(name) else t
