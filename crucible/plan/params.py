"""Exact parameter counts from a ModelConfig, without building the model.

Dense models come straight from ModelConfig. Mixture-of-experts layers are a planning option
(`MoESpec`) until the model grows them: every MLP becomes `num_experts` SwiGLU experts plus
optional always-on shared experts and a linear router, of which `top_k` run per token.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from crucible.config import ModelConfig


@dataclass(frozen=True)
class MoESpec:
    num_experts: int
    top_k: int
    expert_intermediate_size: int
    shared_experts: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"MoE top_k {self.top_k} must be in 1..num_experts {self.num_experts}")


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
    d, hd = cfg.hidden_size, cfg.dim_per_head
    q_out, kv_out = cfg.num_heads * hd, cfg.num_kv_heads * hd
    attn = d * q_out + 2 * d * kv_out + q_out * d  # q, k, v, o projections
    if cfg.attention_bias:  # as in HF Llama: q, k, v and o all carry a bias
        attn += q_out + 2 * kv_out + d
    return attn


def count_params(cfg: ModelConfig, moe: MoESpec | None = None) -> ParamCount:
    d, hd, layers = cfg.hidden_size, cfg.dim_per_head, cfg.num_layers
    qk_norm = 2 * hd if cfg.qk_norm else 0
    embed = cfg.vocab_size * d
    if moe is None:
        mlp, mlp_active = 3 * d * cfg.intermediate_size, None  # gate, up, down
    else:
        expert = 3 * d * moe.expert_intermediate_size
        router = d * moe.num_experts
        mlp = (moe.num_experts + moe.shared_experts) * expert + router
        mlp_active = layers * ((moe.top_k + moe.shared_experts) * expert + router)
    return ParamCount(
        embedding=embed,
        attention=layers * attention_params_per_layer(cfg),
        mlp=layers * mlp,
        norm=layers * (2 * d + qk_norm) + d,  # two norms per block, qk-norm, final norm
        lm_head=0 if cfg.tie_embeddings else embed,
        mlp_active=mlp_active,
    )
