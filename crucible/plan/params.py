"""Exact parameter counts from a ModelConfig, without building the model."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from crucible.config import ModelConfig


@dataclass(frozen=True)
class ParamCount:
    embedding: int
    attention: int
    mlp: int
    norm: int
    lm_head: int  # 0 when the output projection is tied to the embedding

    @property
    def total(self) -> int:
        return self.embedding + self.attention + self.mlp + self.norm + self.lm_head

    @property
    def non_embedding(self) -> int:
        """Parameters that do per-token matmul work in the body (the 'N' of scaling laws)."""
        return self.attention + self.mlp + self.norm

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total}


def count_params(cfg: ModelConfig) -> ParamCount:
    d, hd, layers = cfg.hidden_size, cfg.dim_per_head, cfg.num_layers
    q_out, kv_out = cfg.num_heads * hd, cfg.num_kv_heads * hd
    attn = d * q_out + 2 * d * kv_out + q_out * d  # q, k, v, o projections
    if cfg.attention_bias:  # as in HF Llama: q, k, v and o all carry a bias
        attn += q_out + 2 * kv_out + d
    qk_norm = 2 * hd if cfg.qk_norm else 0
    mlp = 3 * d * cfg.intermediate_size  # gate, up, down
    embed = cfg.vocab_size * d
    return ParamCount(
        embedding=embed,
        attention=layers * attn,
        mlp=layers * mlp,
        norm=layers * (2 * d + qk_norm) + d,  # two norms per block, qk-norm, final norm
        lm_head=0 if cfg.tie_embeddings else embed,
    )
