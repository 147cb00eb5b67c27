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
  * MLP: dense SwiGLU in every layer (num_experts 0, every layer in mlp_only_layers), or MoE in
    every layer (decoder_sparse_step 1, no mlp_only_layers): softmax top-k routing with
    `shared_expert_gate` and shared_experts x expert_intermediate_size =
    shared_expert_intermediate_size (Qwen3-Next's one sigmoid-gated shared expert; ours is
    `mlp.shared_experts`, theirs `mlp.shared_expert`). Experts are written per expert, as in
    hf_moe.py. Mixed dense / MoE layers are refused on import; the balance-loss coefficient is
    converted as for Qwen3-MoE and the training-only MoE options travel in "crucible_moe".
  * norms: Qwen3-Next's RMSNorm scales by (1 + weight) (zero-centred); ours by weight. Exported
    block, final and QK norm weights are ours - 1, imported ones + 1. (The gated norm inside a
    linear layer scales by weight, as ours does, and is copied.)
"""

from __future__ import annotations

import re
from typing import Any

from torch import Tensor

from crucible.config import LinearAttentionConfig, ModelConfig, MoEConfig
from crucible.model.hf_moe import TRAINING_ONLY, hf_aux_coef

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
    moe = cfg.moe
    lacks = [
        ("QK-norm off (set model.qk_norm=true)", not cfg.qk_norm),
        ("ungated attention (set model.attn_output_gate=true)", not cfg.attn_output_gate),
        ("NoPE layers", not all_rope),
    ]
    if moe is not None:
        lacks += [
            ("MoE without a gated shared expert (set model.moe.shared_experts >= 1 and "
             "model.moe.shared_expert_gate=true)", not moe.shared_expert_gate),
            ("sigmoid routing", moe.score != "softmax"),
            ("routed_scaling != 1", moe.routed_scaling != 1.0),
            ("aux-loss-free selection bias (bias_update_rate > 0)", moe.bias_update_rate > 0),
        ]  # fmt: skip
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
        decoder_sparse_step=1,
        output_router_logits=False,
    )
    moe = cfg.moe
    if moe is None:
        d.update(
            num_experts=0,
            num_experts_per_tok=1,
            mlp_only_layers=list(range(cfg.num_layers)),
            moe_intermediate_size=cfg.intermediate_size,
            shared_expert_intermediate_size=cfg.intermediate_size,
        )
    else:
        d.update(
            num_experts=moe.num_experts,
            num_experts_per_tok=moe.top_k,
            mlp_only_layers=[],
            moe_intermediate_size=moe.expert_intermediate_size,
            shared_expert_intermediate_size=moe.shared_experts * moe.expert_intermediate_size,
            norm_topk_prob=moe.norm_topk_prob,
            router_aux_loss_coef=hf_aux_coef(moe.aux_loss_coef, cfg.num_layers, moe.top_k),
        )
        d["crucible_moe"] = {k: getattr(moe, k) for k in TRAINING_ONLY}
    if cfg.linear_attention is not None:
        d["crucible_linear_attention"] = {k: getattr(la, k) for k in _LOCAL}


def _period(kinds: list[str]) -> list[str]:
    n = len(kinds)
    for p in range(1, n + 1):
        if n % p == 0 and kinds == kinds[:p] * (n // p):
            return kinds[:p]
    return kinds  # pragma: no cover - p = n always matches


def hybrid_config_from_hf(hc: Any, ours: dict | None, ours_moe: dict | None) -> dict[str, Any]:
    """ModelConfig fields (qk_norm, attn_output_gate, partial_rotary_factor, linear_attention,
    moe) from a transformers
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
    moe = None
    if sparse and len(sparse) != L:
        raise unsupported(f"dense MLPs among the MoE ones (MoE layers {sparse[:4]}...)")
    if sparse:
        shared, width = hc.shared_expert_intermediate_size, hc.moe_intermediate_size
        if shared <= 0 or shared % width:
            raise unsupported(
                f"shared_expert_intermediate_size {shared} (not a positive multiple of "
                f"moe_intermediate_size {width})"
            )
        fields = dict(
            num_experts=hc.num_experts,
            top_k=hc.num_experts_per_tok,
            expert_intermediate_size=width,
            shared_experts=shared // width,
            shared_expert_gate=True,
            norm_topk_prob=bool(hc.norm_topk_prob),
            aux_loss_coef=hc.router_aux_loss_coef * hc.num_experts_per_tok / L,
        )
        moe = MoEConfig(**{**fields, **(ours_moe or {})})  # an export's training-only options
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
        qk_norm=True,
        attn_output_gate=True,
        partial_rotary_factor=factor,
        linear_attention=la,
        moe=moe,
    )


_SHARED_OURS = re.compile(r"^(layers\.\d+\.mlp)\.shared_experts\.")
_SHARED_HF = re.compile(r"^(layers\.\d+\.mlp)\.shared_expert\.")


def hybrid_to_hf(name: str, t: Tensor) -> tuple[str, Tensor]:
    """One of our state-dict entries -> transformers' name and value (before hf_moe's split)."""
    if _ZERO_CENTRED.match(name):
        t = t - 1
    return _SHARED_OURS.sub(r"\1.shared_expert.", name), t


def hybrid_from_hf(name: str, t: Tensor) -> tuple[str, Tensor]:
    """A transformers entry (prefix stripped) -> our name and value."""
    name = _SHARED_HF.sub(r"\1.shared_experts.", name)
    return name, (t + 1 if _ZERO_CENTRED.match(name) else t)
