"""Training FLOPs per token: 6N for the matmuls plus the attention score/value products."""

from __future__ import annotations

from crucible.config import ModelConfig, MoEConfig
from crucible.plan.params import count_params


def matmul_params(cfg: ModelConfig, moe: MoEConfig | None = None) -> int:
    """Parameters that take part in a matmul per token: the body plus the output projection.

    The input embedding is a lookup (no FLOPs); the output projection always costs vocab x hidden
    multiply-adds per token, tied or not. MoE: only the experts a token is routed to count.
    """
    p = count_params(cfg, moe)
    mlp = p.mlp if p.mlp_active is None else p.mlp_active
    return p.attention + mlp + cfg.vocab_size * cfg.hidden_size


def attention_flops_per_token(cfg: ModelConfig, seq_len: int, causal: bool = True) -> float:
    """Forward+backward FLOPs of QK^T and AV per token (the part 6N leaves out).

    Forward: 2 matmuls x 2 FLOPs x seq_len x (heads x head_dim) per layer; backward is twice that.
    A causal mask halves the useful work; we count the useful work (as MFU should).
    """
    per_layer = 2 * 2 * seq_len * cfg.num_heads * cfg.dim_per_head
    fwd_bwd = 3 * per_layer * cfg.num_layers
    return fwd_bwd / 2 if causal else fwd_bwd


def train_flops_per_token(cfg: ModelConfig, seq_len: int, moe: MoEConfig | None = None) -> float:
    return 6 * matmul_params(cfg, moe) + attention_flops_per_token(cfg, seq_len)
