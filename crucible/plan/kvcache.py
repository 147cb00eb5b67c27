"""KV-cache size: what a deployed model keeps per generated token, the memory side of inference."""

from __future__ import annotations

from crucible.config import ModelConfig


def kv_cache_bytes_per_token(cfg: ModelConfig, bytes_per_value: float = 2) -> float:
    """One K and one V vector per KV head per full-attention layer (GQA shrinks this by
    heads / kv_heads). Gated DeltaNet layers keep a fixed-size state instead: no per-token cost."""
    full = cfg.num_layers - cfg.num_linear_layers
    return 2 * full * cfg.num_kv_heads * cfg.dim_per_head * bytes_per_value


def kv_cache_bytes_per_sequence(
    cfg: ModelConfig, seq_len: int | None = None, bytes_per_value: float = 2
) -> float:
    return kv_cache_bytes_per_token(cfg, bytes_per_value) * (seq_len or cfg.max_seq_len)
