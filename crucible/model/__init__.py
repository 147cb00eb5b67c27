"""The decoder-only transformer, its Hugging Face import/export, and sampling."""

from crucible.model.attention import KVCache
from crucible.model.generate import generate, generate_stream, generate_text
from crucible.model.hf import export_hf, load_hf, model_config_from_hf, to_hf_config
from crucible.model.moe import moe_stats, update_router_bias
from crucible.model.transformer import ModelOutput, Transformer

__all__ = [
    "KVCache",
    "ModelOutput",
    "Transformer",
    "export_hf",
    "generate",
    "generate_stream",
    "generate_text",
    "load_hf",
    "model_config_from_hf",
    "moe_stats",
    "to_hf_config",
    "update_router_bias",
]
