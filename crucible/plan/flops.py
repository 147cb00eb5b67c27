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
    Hybrid models: only full-attention layers pay this; each Gated DeltaNet layer adds
    `linear_state_flops_per_token`, independent of seq_len.
    """
    per_layer = 2 * 2 * seq_len * cfg.num_heads * cfg.dim_per_head
    fwd_bwd = 3 * per_layer * (cfg.num_layers - cfg.num_linear_layers)
    attn = fwd_bwd / 2 if causal else fwd_bwd
    return attn + linear_state_flops_per_token(cfg)


def linear_state_flops_per_token(cfg: ModelConfig) -> float:
    """Forward+backward FLOPs of the Gated DeltaNet state products per token, all linear layers.

    Counted in the recurrent form (the useful work, as for attention): per value head, the state
    S [Dk, Dv] is read with k (S^T k), written (k u^T) and read with q (S^T q): 3 x 2 Dk Dv
    FLOPs forward, times 3 for forward + backward. The chunked algorithm does somewhat more
    (its intra-chunk C x C products), which this deliberately leaves out.
    """
    la = cfg.linear_attention
    if la is None:
        return 0.0
    per_layer = 3 * 2 * la.num_value_heads * la.key_head_dim * la.value_head_dim
    return 3.0 * per_layer * cfg.num_linear_layers


def train_flops_per_token(cfg: ModelConfig, seq_len: int, moe: MoEConfig | None = None) -> float:
    return 6 * matmul_params(cfg, moe) + attention_flops_per_token(cfg, seq_len)
