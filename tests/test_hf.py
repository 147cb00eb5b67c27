"""Hugging Face export/import: transformers reproduces our logits, and load_hf inverts export_hf."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from crucible.config import ModelConfig
from crucible.model import Transformer, export_hf, load_hf, model_config_from_hf, to_hf_config

BASE = dict(
    vocab_size=101,
    hidden_size=64,
    num_layers=4,
    num_heads=4,
    num_kv_heads=4,
    intermediate_size=96,
    max_seq_len=64,
    rope_theta=5000.0,
    norm_eps=1e-6,
    init_std=0.1,  # larger than usual: bigger logits make any mismatch obvious
)

CONFIGS = {
    "mha-tied": {},
    "gqa2to1-untied": {"num_kv_heads": 2, "tie_embeddings": False},
    "gqa4to1": {"num_heads": 8, "num_kv_heads": 2, "head_dim": 16},
    "mqa-bias": {"num_kv_heads": 1, "attention_bias": True},
    "nope-interval": {"nope_interval": 2, "num_kv_heads": 2},
    "nope-list-untied": {"nope_layers": [0, 3], "tie_embeddings": False},
    "qk-norm": {"qk_norm": True, "num_kv_heads": 2, "tie_embeddings": False},
}
EXPECTED_TYPE = {
    "nope-interval": "smollm3",
    "nope-list-untied": "smollm3",
    "qk-norm": "qwen3",
}


def build(overrides: dict, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(**{**BASE, **overrides}))
    # Non-trivial norm gains and biases, so a mix-up of those tensors cannot go unnoticed.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def input_ids() -> torch.Tensor:
    return torch.randint(0, BASE["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_export_matches_transformers_and_round_trips(name: str, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = build(CONFIGS[name]).eval()
    out = export_hf(model, tmp_path / "export")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == EXPECTED_TYPE.get(name, "llama")
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(hf).__name__ == config["architectures"][0]
    x = input_ids()
    with torch.no_grad():
        ours, theirs = model(x).logits, hf(x).logits
    diff = (ours - theirs).abs().max().item()
    assert diff < 1e-4, f"{name}: max |logit diff| {diff:.2e}"

    loaded = load_hf(out)
    assert loaded.cfg == model.cfg
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, ours, rtol=0, atol=0)


def test_config_choices_and_errors() -> None:
    cfg = ModelConfig(**BASE, nope_layers=[1])
    d = to_hf_config(cfg, bos_token_id=None, eos_token_id=0)
    assert d["model_type"] == "smollm3" and d["no_rope_layers"] == [1, 0, 1, 1]
    assert d["eos_token_id"] == 0
    assert model_config_from_hf(d) == cfg
    with pytest.raises(ValueError, match="QK-norm"):
        to_hf_config(ModelConfig(**BASE, qk_norm=True, nope_interval=2))
    d = to_hf_config(ModelConfig(**BASE))
    d["rope_parameters"] = {"rope_type": "linear", "factor": 2.0, "rope_theta": 5000.0}
    d.pop("rope_theta")
    assert model_config_from_hf(d).rope_scaling.factor == 2.0  # RoPE scaling is imported
    with pytest.raises(ValueError, match="rope_type 'longrope'"):
        d["rope_parameters"] = {"rope_type": "longrope", "rope_theta": 5000.0, "factor": 2.0,
                                "short_factor": [1.0] * 8, "long_factor": [2.0] * 8}  # fmt: skip
        model_config_from_hf(d)
    with pytest.raises(ValueError, match="model_type"):
        model_config_from_hf({"model_type": "gpt2"})


def test_export_replaces_existing_dir_and_casts(tmp_path: Path) -> None:
    model = build({})
    export_hf(model, tmp_path / "m")
    (tmp_path / "m" / "stale.txt").write_text("old")
    export_hf(model, tmp_path / "m", dtype=torch.bfloat16)
    assert not (tmp_path / "m" / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temp dirs left behind
    assert json.loads((tmp_path / "m" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    loaded = load_hf(tmp_path / "m", dtype=None)
    assert loaded.embed.weight.dtype == torch.bfloat16


def _tiny_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["hello", "world", "the", "a", "cat", "[UNK]"]
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<|endoftext|>", "<|pad|>"])
    tok.save(str(path))


def test_export_with_tokenizer(tmp_path: Path) -> None:
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    _tiny_tokenizer(tmp_path / "tokenizer.json")
    model = build({})
    out = export_hf(model, tmp_path / "export", tokenizer_path=tmp_path / "tokenizer.json")
    assert (out / "tokenizer.json").exists() and (out / "tokenizer_config.json").exists()
    hf_tok = AutoTokenizer.from_pretrained(out)
    raw = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    text = "hello the cat world"
    assert hf_tok(text)["input_ids"] == raw.encode(text).ids
    eos = raw.token_to_id("<|endoftext|>")
    assert hf_tok.eos_token == "<|endoftext|>" and hf_tok.pad_token == "<|pad|>"
    assert hf_tok.model_max_length == BASE["max_seq_len"]
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == eos
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == eos


def test_export_without_special_tokens(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel(vocab={"x": 0, "y": 1}, unk_token="x")).save(
        str(tmp_path / "t.json")
    )
    out = export_hf(build({}), tmp_path / "export", tokenizer_path=tmp_path / "t.json")
    assert json.loads((out / "config.json").read_text())["eos_token_id"] is None


@pytest.mark.parametrize("tied", [False, True])
def test_load_transformers_llama(tied: bool, tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=101,
        hidden_size=64,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rope_theta=20000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tied,
    )
    hf = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    hf.save_pretrained(tmp_path / "llama")
    ours = load_hf(tmp_path / "llama")
    assert ours.cfg.num_kv_heads == 2 and ours.cfg.rope_theta == 20000.0
    assert ours.cfg.tie_embeddings == tied
    x = input_ids()
    with torch.no_grad():
        diff = (ours(x).logits - hf(x).logits).abs().max().item()
    assert diff < 1e-4, f"max |logit diff| {diff:.2e}"
