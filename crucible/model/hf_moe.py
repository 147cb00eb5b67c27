"""The mixture-of-experts side of the transformers export/import (see crucible/model/hf.py).

Two architectures, chosen by the router's score function:
  * "qwen3_moe" (Qwen3MoeForCausalLM): softmax top-k, optional renormalisation of the k scores;
    QK-norm; no shared experts, no selection bias.
  * "glm4_moe" (Glm4MoeForCausalLM): sigmoid top-k with DeepSeek-V3's selection bias
    (`e_score_correction_bias`, our `expert_bias`), optional renormalisation and routed scaling,
    shared experts; QK-norm optional; no attention bias (its output projection has none).
Both are exported with MoE in every layer (no leading dense layers), full RoPE and one expert
group, and refused on import when a checkpoint uses anything else.

Experts are written one tensor per expert (`mlp.experts.<e>.{gate,up,down}_proj.weight`, the
layout of published checkpoints, which transformers 5 fuses on load); both that and the fused
layout (`mlp.experts.gate_up_proj` [E, 2I, D], `mlp.experts.down_proj` [E, D, I]) load.

Training-only options that neither architecture has a field for (the balancing coefficients and
rates, the dispatch) are kept in config.json under "crucible_moe", which transformers ignores, so
export followed by import gives back the same config.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor

from crucible.config import ModelConfig, MoEConfig

MOE_ARCHS = {"qwen3_moe": "Qwen3MoeForCausalLM", "glm4_moe": "Glm4MoeForCausalLM"}

TRAINING_ONLY = ("aux_loss_coef", "bias_update_rate", "router_z_loss", "dispatch")

# DeepSeek-V3's bias update speed (gamma = 0.001), given to imported sigmoid-routed models so that
# their selection bias exists (it is a buffer only when the update rate is > 0).
IMPORTED_BIAS_RATE = 1e-3

_BIAS_OURS = re.compile(r"^(layers\.\d+\.mlp)\.expert_bias$")
_BIAS_HF = re.compile(r"^(layers\.\d+\.mlp)\.gate\.e_score_correction_bias$")
_FUSED = re.compile(r"^(layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)$")
_PER_EXPERT = re.compile(r"^(layers\.\d+\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$")


def moe_model_type(cfg: ModelConfig, all_rope: bool) -> str:
    """qwen3_moe or glm4_moe for a MoE config; ValueError naming what neither represents."""
    moe = cfg.moe
    assert moe is not None
    if moe.score == "softmax":
        arch, lacks = (
            "Qwen3-MoE",
            [
                ("QK-norm off (set model.qk_norm=true)", not cfg.qk_norm),
                ("shared experts", moe.shared_experts > 0),
                ("routed_scaling != 1", moe.routed_scaling != 1.0),
                ("aux-loss-free selection bias (bias_update_rate > 0)", moe.bias_update_rate > 0),
            ],
        )
    else:
        arch, lacks = (
            "GLM-4-MoE (sigmoid routing)",
            [
                ("attention bias", cfg.attention_bias),
                ("single-expert layers (num_experts < 2)", moe.num_experts < 2),
            ],
        )
    lacks.append(("NoPE layers", not all_rope))
    missing = [what for what, bad in lacks if bad]
    if missing:
        raise ValueError(
            f"cannot export this MoE model to transformers' {arch}, which has no "
            + ", no ".join(missing)
        )
    return "qwen3_moe" if moe.score == "softmax" else "glm4_moe"


def hf_aux_coef(coef: float, layers: int, top_k: int) -> float:
    """Our coefficient weighs each layer's balance loss (1.0 when balanced) and sums the layers;
    transformers pools all layers into one loss that is top_k when balanced. This factor keeps
    the training objective the same across the two conventions."""
    return coef * layers / top_k


def moe_hf_config(cfg: ModelConfig, model_type: str, d: dict[str, Any]) -> None:
    """Add the MoE fields of `model_type` to the config.json dict `d` (in place)."""
    moe = cfg.moe
    assert moe is not None
    common = dict(
        num_experts_per_tok=moe.top_k,
        moe_intermediate_size=moe.expert_intermediate_size,
        norm_topk_prob=moe.norm_topk_prob,
        output_router_logits=False,
    )
    d["crucible_moe"] = {k: getattr(moe, k) for k in TRAINING_ONLY}
    if model_type == "qwen3_moe":
        d.pop("max_window_layers", None)
        d.update(
            common,
            num_experts=moe.num_experts,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            router_aux_loss_coef=hf_aux_coef(moe.aux_loss_coef, cfg.num_layers, moe.top_k),
        )
        return
    for key in ("use_sliding_window", "sliding_window", "max_window_layers", "layer_types"):
        d.pop(key, None)
    d["rope_parameters"] = {**d["rope_parameters"], "partial_rotary_factor": 1.0}
    d.update(
        common,
        n_routed_experts=moe.num_experts,
        n_shared_experts=moe.shared_experts,
        routed_scaling_factor=moe.routed_scaling,
        n_group=1,
        topk_group=1,
        first_k_dense_replace=0,
        use_qk_norm=cfg.qk_norm,
        num_mtp_layers=0,
    )


def moe_config_from_hf(model_type: str, hc: Any, ours: dict | None) -> tuple[MoEConfig, bool]:
    """(MoEConfig, qk_norm) from a transformers qwen3_moe / glm4_moe config object, with the
    training-only options from `ours` (config.json's "crucible_moe") where an export wrote them.
    """
    moe, qk_norm = _moe_from_hf(model_type, hc)
    if ours:
        moe = MoEConfig(**{**moe.model_dump(), **ours})
    return moe, qk_norm


def _moe_from_hf(model_type: str, hc: Any) -> tuple[MoEConfig, bool]:

    def unsupported(what: str) -> ValueError:
        return ValueError(f"cannot load {model_type} checkpoint: {what} is not supported")

    common = dict(
        top_k=hc.num_experts_per_tok,
        expert_intermediate_size=hc.moe_intermediate_size,
        norm_topk_prob=bool(hc.norm_topk_prob),
    )
    if model_type == "qwen3_moe":
        if hc.mlp_only_layers or hc.decoder_sparse_step != 1:
            raise unsupported(
                "dense layers among the MoE ones (mlp_only_layers, decoder_sparse_step)"
            )
        coef = hc.router_aux_loss_coef * hc.num_experts_per_tok / hc.num_hidden_layers
        return MoEConfig(num_experts=hc.num_experts, aux_loss_coef=coef, **common), True
    if hc.first_k_dense_replace:
        raise unsupported(
            f"leading dense layers (first_k_dense_replace {hc.first_k_dense_replace})"
        )
    if hc.n_group != 1 or hc.topk_group != 1:
        raise unsupported(f"group-limited routing (n_group {hc.n_group})")
    if hc.attention_bias:
        raise unsupported("attention bias without an output-projection bias")
    factor = (getattr(hc, "rope_parameters", None) or {}).get("partial_rotary_factor", 1.0)
    if factor != 1.0:
        raise unsupported(f"partial RoPE (partial_rotary_factor {factor})")
    moe = MoEConfig(
        num_experts=hc.n_routed_experts,
        shared_experts=hc.n_shared_experts,
        score="sigmoid",
        routed_scaling=hc.routed_scaling_factor,
        bias_update_rate=IMPORTED_BIAS_RATE,
        **common,
    )
    return moe, bool(hc.use_qk_norm)


# --------------------------------------------------------------------------- weights


def to_hf_tensors(name: str, t: Tensor) -> dict[str, Tensor]:
    """One of our state-dict entries -> transformers entries (names without the model. prefix)."""
    m = _BIAS_OURS.match(name)
    if m is not None:
        return {f"{m.group(1)}.gate.e_score_correction_bias": t}
    m = _FUSED.match(name)
    if m is None:
        return {name: t}
    prefix, kind = m.groups()
    out = {}
    for e in range(t.shape[0]):
        if kind == "down_proj":
            out[f"{prefix}.{e}.down_proj.weight"] = t[e]
        else:
            gate, up = t[e].chunk(2, dim=0)
            out[f"{prefix}.{e}.gate_proj.weight"] = gate
            out[f"{prefix}.{e}.up_proj.weight"] = up
    return out


def missing_hf_tensors(cfg: ModelConfig, model_type: str) -> dict[str, Tensor]:
    """GLM-4-MoE always has a selection bias: zeros when we trained without one."""
    moe = cfg.moe
    if model_type != "glm4_moe" or moe is None or moe.bias_update_rate > 0:
        return {}
    return {
        f"layers.{i}.mlp.gate.e_score_correction_bias": torch.zeros(moe.num_experts)
        for i in range(cfg.num_layers)
    }


def from_hf_tensors(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Transformers entries (prefix already stripped) -> ours: fuse per-expert tensors, rename
    the selection bias."""
    groups: dict[str, dict[str, dict[int, Tensor]]] = {}
    out = {}
    for name, t in state.items():
        b = _BIAS_HF.match(name)
        m = _PER_EXPERT.match(name)
        if b is not None:
            out[f"{b.group(1)}.expert_bias"] = t
        elif m is not None:
            prefix, e, kind = m.groups()
            groups.setdefault(prefix, {}).setdefault(kind, {})[int(e)] = t
        else:
            out[name] = t
    for prefix, kinds in groups.items():
        n = max(len(v) for v in kinds.values())
        parts = {}
        for kind in ("gate", "up", "down"):
            got = kinds.get(kind, {})
            if sorted(got) != list(range(n)):
                raise ValueError(f"{prefix}: {kind}_proj weights missing for some of {n} experts")
            parts[kind] = torch.stack([got[e] for e in range(n)])
        out[f"{prefix}.gate_up_proj"] = torch.cat([parts["gate"], parts["up"]], dim=1)
        out[f"{prefix}.down_proj"] = parts["down"]
    return out
