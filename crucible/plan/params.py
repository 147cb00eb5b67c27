"""Exact parameter counts from a ModelConfig, without building the model.

This is the one source of the counts: `crucible count-params`, the planner, the trainer's MFU and
the ablation runner all read it, and tests compare it with `sum(p.numel())` of the built model.
Mixture-of-experts (`ModelConfig.moe`, or a `MoEConfig` passed for planning): every MLP becomes
`num_experts` SwiGLU experts plus optional always-on shared experts and a linear router, of which
`top_k` routed experts run per token. Buffers (the aux-loss-free selection bias) are not parameters.
Hybrid models (`ModelConfig.linear_attention`): `attention` counts every token mixer, the full
attention layers' projections plus the Gated DeltaNet layers' (projections, conv, decay
parameters and gated norm); `norm` counts QK-norms only on full-attention layers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from crucible.config import ModelConfig, MoEConfig


@dataclass(frozen=True)
class ParamCount:
    embedding: int
    attention: int
    mlp: int
    norm: int
    lm_head: int  # 0 when the output projection is tied to the embedding
    mlp_active: int | None = None  # MoE: MLP parameters one token runs through (None: dense)

    @property
    def total(self) -> int:
        return self.embedding + self.attention + self.mlp + self.norm + self.lm_head

    @property
    def active(self) -> int:
        """Parameters a token touches: the total for dense models, top-k experts for MoE."""
        return self.total - self.mlp + (self.mlp if self.mlp_active is None else self.mlp_active)

    @property
    def non_embedding(self) -> int:
        """Parameters that do per-token matmul work in the body (the 'N' of scaling laws)."""
        return self.attention + self.mlp + self.norm

    def as_dict(self) -> dict[str, int]:
        d = {k: v for k, v in asdict(self).items() if v is not None}
        if self.mlp_active is not None:
            d["active"] = self.active
        return {**d, "total": self.total}

    def shares(self) -> dict[str, float]:
        """Each component's fraction of the total (embedding, attention, mlp, norm, lm_head)."""
        parts = ("embedding", "attention", "mlp", "norm", "lm_head")
        return {k: getattr(self, k) / self.total for k in parts}


def attention_params_per_layer(cfg: ModelConfig) -> int:
    """One full-attention layer's projections."""
    d, hd = cfg.hidden_size, cfg.dim_per_head
    q_out, kv_out = cfg.num_heads * hd, cfg.num_kv_heads * hd
    q_proj = 2 * q_out if cfg.attn_output_gate else q_out  # gated attention: query + gate
    attn = d * q_proj + 2 * d * kv_out + q_out * d  # q, k, v, o projections
    if cfg.attention_bias:  # as in HF Llama: q, k, v and o all carry a bias
        attn += q_proj + 2 * kv_out + d
    return attn


def linear_attention_params_per_layer(cfg: ModelConfig) -> int:
    """One Gated DeltaNet layer: in_proj_qkvz, in_proj_ba, conv1d, dt_bias, A_log, norm, out_proj."""
    la = cfg.linear_attention
    if la is None:
        return 0
    d = cfg.hidden_size
    key, value = la.num_key_heads * la.key_head_dim, la.num_value_heads * la.value_head_dim
    proj = d * (2 * key + 2 * value) + d * 2 * la.num_value_heads + value * d
    conv = (2 * key + value) * la.conv_kernel
    return proj + conv + 2 * la.num_value_heads + la.value_head_dim


def mixer_params_per_layer(cfg: ModelConfig) -> int:
    """Token-mixer parameters of an average layer (rounded up); exact for uniform models."""
    return -(-mixer_params(cfg) // cfg.num_layers)


def mixer_params(cfg: ModelConfig) -> int:
    """All token-mixer parameters: full-attention layers plus Gated DeltaNet layers."""
    linear = cfg.num_linear_layers
    full = cfg.num_layers - linear
    return full * attention_params_per_layer(cfg) + linear * linear_attention_params_per_layer(cfg)


def mlp_params_per_layer(cfg: ModelConfig, moe: MoEConfig | None = None) -> tuple[int, int]:
    """(stored, active per token) parameters of one block's MLP; `moe` defaults to cfg.moe."""
    moe = moe if moe is not None else cfg.moe
    d = cfg.hidden_size
    if moe is None:
        dense = 3 * d * cfg.intermediate_size  # gate, up, down
        return dense, dense
    expert = 3 * d * moe.expert_intermediate_size
    router = d * moe.num_experts + (d if moe.shared_expert_gate else 0)  # + shared-expert gate
    stored = (moe.num_experts + moe.shared_experts) * expert + router
    return stored, (moe.top_k + moe.shared_experts) * expert + router


def count_params(cfg: ModelConfig, moe: MoEConfig | None = None) -> ParamCount:
    """Parameters by component; `moe` (planning) defaults to the config's own `moe`."""
    d, hd, layers = cfg.hidden_size, cfg.dim_per_head, cfg.num_layers
    qk_norm = 2 * hd if cfg.qk_norm else 0
    embed = cfg.vocab_size * d
    moe = moe if moe is not None else cfg.moe
    mlp, mlp_active = mlp_params_per_layer(cfg, moe)
    full = layers - cfg.num_linear_layers
    return ParamCount(
        embedding=embed,
        attention=mixer_params(cfg),
        mlp=layers * mlp,
        norm=layers * 2 * d + full * qk_norm + d,  # two norms per block, qk-norm, final norm
        lm_head=0 if cfg.tie_embeddings else embed,
        mlp_active=None if moe is None else layers * mlp_active,
    )
