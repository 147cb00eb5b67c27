"""Export to and import from the Hugging Face transformers checkpoint layout.

Architectures (chosen from the config, most specific that represents it exactly):
  * "llama" (LlamaForCausalLM): every layer uses RoPE, no QK-norm.
  * "smollm3" (SmolLM3ForCausalLM): some layers skip RoPE (NoPE), no QK-norm.
  * "qwen3" (Qwen3ForCausalLM): QK-norm over head_dim, every layer uses RoPE.
  * "qwen3_moe" / "glm4_moe": mixture-of-experts models (softmax / sigmoid routing), see
    crucible/model/hf_moe.py.
  * "qwen3_next" (Qwen3NextForCausalLM): hybrid models (Gated DeltaNet layers) and gated
    attention, see crucible/model/hf_hybrid.py.
Intra-document masking is a training-time choice with no config counterpart; exported models
attend causally over the whole input, which is what inference on one document needs.

Weights go into a single model.safetensors (no pickle) under transformers' parameter names, which
our module names already follow except for the prefixes handled by `_to_hf_name` (and the MoE
expert layout, handled in hf_moe.py).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from safetensors.torch import load_file, save_file
from torch import Tensor

from crucible.config import ModelConfig, RopeScalingConfig
from crucible.model.hf_hybrid import (
    HYBRID_ARCHS,
    check_hybrid_export,
    hybrid_config_from_hf,
    hybrid_from_hf,
    hybrid_hf_config,
    hybrid_to_hf,
    is_hybrid,
)
from crucible.model.hf_moe import (
    MOE_ARCHS,
    from_hf_tensors,
    missing_hf_tensors,
    moe_config_from_hf,
    moe_hf_config,
    moe_model_type,
    to_hf_tensors,
)
from crucible.model.transformer import Transformer

_ARCHS = {
    "llama": "LlamaForCausalLM",
    "smollm3": "SmolLM3ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    **MOE_ARCHS,
    **HYBRID_ARCHS,
}

# Special-token spellings we recognise in a tokenizer's vocabulary, most preferred first.
_SPECIAL_CANDIDATES = {
    "bos_token": ["<|bos|>", "<|begin_of_text|>", "<|startoftext|>", "<s>", "<bos>"],
    "eos_token": ["<|endoftext|>", "<|eos|>", "<|end_of_text|>", "</s>", "<eos>"],
    "pad_token": ["<|pad|>", "<pad>"],
    "unk_token": ["<|unk|>", "<unk>"],
}


# --------------------------------------------------------------------------- config


def hf_model_type(cfg: ModelConfig) -> str:
    """Which transformers architecture represents `cfg`; ValueError if none does."""
    all_rope = all(cfg.uses_rope(i) for i in range(cfg.num_layers))
    if is_hybrid(cfg):
        return check_hybrid_export(cfg, all_rope)
    if cfg.partial_rotary_factor != 1.0:
        raise ValueError(
            "cannot export partial RoPE (partial_rotary_factor "
            f"{cfg.partial_rotary_factor}) except as Qwen3-Next: set model.qk_norm=true and "
            "model.attn_output_gate=true"
        )
    if cfg.moe is not None:
        return moe_model_type(cfg, all_rope)
    if cfg.qk_norm:
        if not all_rope:
            raise ValueError(
                "cannot export to transformers: no architecture there combines QK-norm "
                "(qk_norm=true) with NoPE layers (nope_interval / nope_layers)"
            )
        return "qwen3"
    if not all_rope:
        return "smollm3"
    if cfg.hidden_size % cfg.num_heads:
        # LlamaConfig validates this even when head_dim is given explicitly.
        raise ValueError(
            f"cannot export to transformers' Llama: hidden_size {cfg.hidden_size} is not a "
            f"multiple of num_heads {cfg.num_heads}"
        )
    return "llama"


_YARN_KEYS = ("beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim", "truncate")


def hf_rope_scaling(cfg: ModelConfig) -> dict[str, Any]:
    """The RoPE part of config.json without rope_theta: {"rope_type": ..., "factor": ...}."""
    rs = cfg.rope_scaling
    if rs is None:
        return {"rope_type": "default"}
    d: dict[str, Any] = {"rope_type": rs.type, "factor": rs.factor}
    if rs.type == "yarn":
        d["original_max_position_embeddings"] = cfg.rope_original_len
        d.update({k: getattr(rs, k) for k in _YARN_KEYS if getattr(rs, k) is not None})
    return d


def rope_scaling_from_hf(
    rope: dict[str, Any], max_position_embeddings: int
) -> tuple[RopeScalingConfig | None, int]:
    """(rope_scaling, max_seq_len) from transformers' rope_parameters and max_position_embeddings.

    For dynamic scaling, max_position_embeddings is where scaling starts, so the model accepts
    original x factor positions (the length the factor was chosen for).
    """
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "default":
        return None, max_position_embeddings
    if rope_type not in ("linear", "dynamic", "yarn"):
        raise ValueError(
            f"unsupported RoPE scaling rope_type {rope_type!r}; supported: default, linear, "
            "dynamic, yarn"
        )
    factor = rope.get("factor")
    original = rope.get("original_max_position_embeddings")
    if rope_type == "linear":
        return RopeScalingConfig(type="linear", factor=factor), max_position_embeddings
    if rope_type == "dynamic":
        rs = RopeScalingConfig(
            type="dynamic", factor=factor, original_max_position_embeddings=max_position_embeddings
        )
        return rs, int(round(max_position_embeddings * factor))
    original = original or max_position_embeddings
    if factor is None:  # DeepSeek-style configs imply the factor by the two lengths
        factor = max_position_embeddings / original
    extra = {k: rope[k] for k in _YARN_KEYS if rope.get(k) is not None}
    rs = RopeScalingConfig(
        type="yarn", factor=factor, original_max_position_embeddings=original, **extra
    )
    return rs, max_position_embeddings


def to_hf_config(
    cfg: ModelConfig, bos_token_id: int | None = None, eos_token_id: int | None = None
) -> dict[str, Any]:
    """The config.json contents for `cfg` (see the module docstring for the architecture)."""
    model_type = hf_model_type(cfg)
    d: dict[str, Any] = {
        "architectures": [_ARCHS[model_type]],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.dim_per_head,
        "hidden_act": "silu",
        # transformers' dynamic NTK scaling starts beyond max_position_embeddings.
        "max_position_embeddings": (
            cfg.rope_original_len
            if cfg.rope_scaling is not None and cfg.rope_scaling.type == "dynamic"
            else cfg.max_seq_len
        ),
        "initializer_range": cfg.init_std,
        "rms_norm_eps": cfg.norm_eps,
        # Both spellings: transformers >= 5 reads rope_parameters, 4.x rope_theta + rope_scaling.
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_theta": cfg.rope_theta, **hf_rope_scaling(cfg)},
        "rope_scaling": hf_rope_scaling(cfg) if cfg.rope_scaling is not None else None,
        "attention_bias": cfg.attention_bias,
        "attention_dropout": 0.0,
        "tie_word_embeddings": cfg.tie_embeddings,
        "use_cache": True,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": None,
        "torch_dtype": "float32",
    }
    if model_type == "llama":
        d["mlp_bias"] = False
    elif model_type == "smollm3":
        d["mlp_bias"] = False
        d["no_rope_layers"] = [int(cfg.uses_rope(i)) for i in range(cfg.num_layers)]
        d["no_rope_layer_interval"] = cfg.nope_interval or cfg.num_layers + 1
        d["use_sliding_window"] = False
        d["sliding_window"] = None
        d["layer_types"] = ["full_attention"] * cfg.num_layers
    else:  # qwen3, qwen3_moe
        d["use_sliding_window"] = False
        d["sliding_window"] = None
        d["max_window_layers"] = cfg.num_layers
        d["layer_types"] = ["full_attention"] * cfg.num_layers
    if cfg.moe is not None and model_type in MOE_ARCHS:
        moe_hf_config(cfg, model_type, d)
    if model_type == "qwen3_next":
        hybrid_hf_config(cfg, d)
    return d


def model_config_from_hf(d: dict[str, Any]) -> ModelConfig:
    """A ModelConfig from a transformers config.json dict (one of the architectures above)."""
    from transformers import AutoConfig  # deferred: importing transformers takes seconds

    model_type = d.get("model_type")
    if model_type not in _ARCHS:
        raise ValueError(f"unsupported model_type {model_type!r}; supported: {', '.join(_ARCHS)}")
    # Let transformers fill defaults and normalise legacy fields (rope_theta, torch_dtype...).
    skip = ("model_type", "crucible_moe", "crucible_linear_attention")
    hc = AutoConfig.for_model(model_type, **{k: v for k, v in d.items() if k not in skip})

    def unsupported(what: str) -> ValueError:
        return ValueError(f"cannot load {model_type} checkpoint: {what} is not supported")

    if getattr(hc, "hidden_act", "silu") != "silu":
        raise unsupported(f"hidden_act {hc.hidden_act!r}")
    if getattr(hc, "mlp_bias", False):
        raise unsupported("mlp_bias")
    if getattr(hc, "use_sliding_window", False):
        raise unsupported("sliding-window attention")
    moe, qk_norm = None, model_type == "qwen3"
    hybrid: dict[str, Any] = {}
    if model_type in MOE_ARCHS:
        moe, qk_norm = moe_config_from_hf(model_type, hc, d.get("crucible_moe"))
    elif model_type in HYBRID_ARCHS:
        hybrid = hybrid_config_from_hf(
            hc, d.get("crucible_linear_attention"), d.get("crucible_moe")
        )
        qk_norm, moe = hybrid.pop("qk_norm"), hybrid.pop("moe")
    rope = getattr(hc, "rope_parameters", None) or {}
    try:
        rope_scaling, max_seq_len = rope_scaling_from_hf(rope, hc.max_position_embeddings)
    except ValidationError as e:
        msg = e.errors()[0]["msg"].removeprefix("Value error, ")
        raise ValueError(f"cannot load {model_type} checkpoint: {msg}") from None
    theta = rope.get("rope_theta", getattr(hc, "rope_theta", 10000.0))

    num_layers, heads = hc.num_hidden_layers, hc.num_attention_heads
    head_dim = getattr(hc, "head_dim", None) or hc.hidden_size // heads
    nope_interval, nope_layers = 0, []
    if model_type == "smollm3":
        flags = list(hc.no_rope_layers)[:num_layers]
        nope_layers = [i for i, f in enumerate(flags) if not f]
        every = hc.no_rope_layer_interval
        if (
            nope_layers
            and every
            and [i for i in range(num_layers) if (i + 1) % every == 0] == (nope_layers)
        ):
            nope_interval, nope_layers = every, []
    return ModelConfig(
        vocab_size=hc.vocab_size,
        hidden_size=hc.hidden_size,
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=hc.num_key_value_heads or heads,
        head_dim=None if head_dim * heads == hc.hidden_size else head_dim,
        intermediate_size=hc.intermediate_size,
        max_seq_len=max_seq_len,
        rope_theta=float(theta),
        rope_scaling=rope_scaling,
        nope_interval=nope_interval,
        nope_layers=nope_layers,
        tie_embeddings=bool(hc.tie_word_embeddings),
        qk_norm=qk_norm,
        attention_bias=bool(getattr(hc, "attention_bias", False)),
        norm_eps=hc.rms_norm_eps,
        init_std=hc.initializer_range,
        moe=moe,
        **hybrid,
    )


# --------------------------------------------------------------------------- weights


def _to_hf_name(name: str) -> str:
    if name.startswith("lm_head."):
        return name
    if name.startswith("embed."):
        return "model.embed_tokens." + name.removeprefix("embed.")
    return "model." + name


def _from_hf_name(name: str) -> str:
    if name.startswith("model.embed_tokens."):
        return "embed." + name.removeprefix("model.embed_tokens.")
    return name.removeprefix("model.")


def _unwrap(model: torch.nn.Module) -> Transformer:
    # torch.compile wraps in `_orig_mod`, DDP / FSDP1 in `module`.
    while not isinstance(model, Transformer):
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if inner is None:
            raise TypeError(f"expected a crucible Transformer, got {type(model).__name__}")
        model = inner
    return model


def _full_tensor(t: Tensor) -> Tensor:
    # FSDP2 parameters are DTensors; gathering them is a collective every rank must call.
    return t.full_tensor() if hasattr(t, "full_tensor") else t


# --------------------------------------------------------------------------- tokenizer


def _special_tokens(vocab: dict[str, int]) -> dict[str, str]:
    found = {}
    for role, spellings in _SPECIAL_CANDIDATES.items():
        for s in spellings:
            if s in vocab:
                found[role] = s
                break
    return found


def _save_tokenizer(
    tokenizer_file: Path,
    out_dir: Path,
    specials: dict[str, str],
    max_len: int,
    chat_template: str | None = None,
) -> None:
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_file=str(tokenizer_file),
        model_max_length=max_len,
        chat_template=chat_template,  # saved as chat_template.jinja, where transformers reads it
        **specials,
    )
    tok.save_pretrained(str(out_dir))


# --------------------------------------------------------------------------- export / load


def export_hf(
    model: torch.nn.Module,
    out_dir: str | os.PathLike,
    tokenizer_path: str | os.PathLike | None = None,
    *,
    dtype: torch.dtype | None = None,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    chat_template: str | None = None,
    end_of_turn: str = "<|im_end|>",
) -> Path:
    """Write a transformers-loadable checkpoint of `model` to out_dir and return its path.

    Files: model.safetensors, config.json, generation_config.json, and with tokenizer_path (a
    tokenizers tokenizer.json) tokenizer.json + tokenizer_config.json. bos/eos ids default to
    recognised special tokens in the tokenizer (e.g. <|endoftext|>). dtype casts the weights
    (default: keep). The directory is written elsewhere and renamed into place, so readers never
    see a half-written export; an existing out_dir is replaced.
    chat_template (Jinja text, needs tokenizer_path): written as chat_template.jinja beside the
    tokenizer, and the `end_of_turn` token joins the EOS ids of generation_config.json so that
    `generate` stops at the end of an assistant turn.
    """
    net = _unwrap(model)
    cfg = net.cfg
    out = Path(out_dir)
    specials: dict[str, str] = {}
    vocab: dict[str, int] = {}
    if tokenizer_path is not None:
        from tokenizers import Tokenizer

        tokenizer_path = Path(tokenizer_path)
        vocab = Tokenizer.from_file(str(tokenizer_path)).get_vocab(with_added_tokens=True)
        specials = _special_tokens(vocab)
        if bos_token_id is None and "bos_token" in specials:
            bos_token_id = vocab[specials["bos_token"]]
        if eos_token_id is None and "eos_token" in specials:
            eos_token_id = vocab[specials["eos_token"]]
        if len(vocab) > cfg.vocab_size:
            raise ValueError(
                f"tokenizer has {len(vocab)} tokens but the model's vocab_size is {cfg.vocab_size}"
            )
    if chat_template is not None and tokenizer_path is None:
        raise ValueError("a chat_template needs the tokenizer (tokenizer_path) to ship with")
    stop_ids: int | list[int] | None = eos_token_id
    if chat_template is not None and end_of_turn in vocab:
        stop_ids = [i for i in (eos_token_id, vocab[end_of_turn]) if i is not None]
    hf_cfg = to_hf_config(cfg, bos_token_id=bos_token_id, eos_token_id=eos_token_id)

    tensors: dict[str, Tensor] = {}
    for name, t in net.state_dict().items():
        t = _full_tensor(t).detach().to("cpu")
        if hf_cfg["model_type"] == "qwen3_next":
            name, t = hybrid_to_hf(name, t)  # zero-centred norms (before any down-cast), names
        if dtype is not None:
            t = t.to(dtype)
        for part, tp in to_hf_tensors(name, t).items():
            tensors[_to_hf_name(part)] = tp.contiguous()
    for part, tp in missing_hf_tensors(cfg, hf_cfg["model_type"]).items():
        tensors[_to_hf_name(part)] = tp if dtype is None else tp.to(dtype)
    hf_cfg["torch_dtype"] = str(next(iter(tensors.values())).dtype).removeprefix("torch.")

    check_export_dir(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        (tmp / EXPORT_MARKER).write_text("written by crucible export; a re-export replaces it\n")
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
        gen = {"bos_token_id": bos_token_id, "eos_token_id": stop_ids}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        if tokenizer_path is not None:
            _save_tokenizer(tokenizer_path, tmp, specials, cfg.max_seq_len, chat_template)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


EXPORT_MARKER = ".crucible-export"


def check_export_dir(
    out: str | os.PathLike, protect: list[Path] | tuple = (), flag: str = "out_dir"
) -> None:
    """Refuse an output directory whose replacement would lose data: one of `protect` (or a
    directory holding one, or inside one's checkpoints), a file, or a non-empty directory that is
    not a previous export (exports carry a marker file). Raises ConfigError before any work."""
    from crucible.config import ConfigError

    o = Path(out).resolve()
    for p in protect:
        p = Path(p).resolve()
        if o == p or p.is_relative_to(o) or o.is_relative_to(p / "checkpoints"):
            raise ConfigError(
                f"{flag} {out}: would replace {p} or part of it; choose a new directory "
                f"(the default is {Path(p) / 'hf'})"
            )
    if o.exists() and not o.is_dir():
        raise ConfigError(f"{flag} {out}: exists and is not a directory")
    if o.is_dir() and any(o.iterdir()) and not (o / EXPORT_MARKER).is_file():
        raise ConfigError(
            f"{flag} {out}: a non-empty directory that is not a previous export (no "
            f"{EXPORT_MARKER}); choose a new or empty directory (nothing was deleted)"
        )
    probe = o.parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {out}: not writable (checked {probe})")


def _replace_dir(src: Path, dst: Path) -> None:
    """Rename src to dst; an existing dst is moved aside first and deleted afterwards."""
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        dst.rename(old)
    src.rename(dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    single = path / "model.safetensors"
    if single.exists():
        return load_file(str(single))
    index = path / "model.safetensors.index.json"
    if not index.exists():
        raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    tensors: dict[str, Tensor] = {}
    for shard in shards:
        tensors.update(load_file(str(path / shard)))
    return tensors


def load_hf(
    path: str | os.PathLike,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = torch.float32,
) -> Transformer:
    """Build a Transformer from a transformers checkpoint directory (config.json + safetensors).

    dtype casts the weights (default fp32, what training expects; None keeps the stored dtype).
    """
    path = Path(path)
    cfg = model_config_from_hf(json.loads((path / "config.json").read_text()))
    hf = _read_safetensors(path)

    state: dict[str, Tensor] = {}
    for name, t in hf.items():
        ours = _from_hf_name(name)
        if ours.endswith("rotary_emb.inv_freq"):
            continue  # old checkpoints stored the RoPE table; we recompute it
        if ours == "lm_head.weight" and cfg.tie_embeddings:
            continue  # some tied checkpoints also store the (identical) output matrix
        if is_hybrid(cfg):
            ours, t32 = hybrid_from_hf(ours, t.float())
            t = t32.to(t.dtype if dtype is None else dtype)
        state[ours] = t if dtype is None else t.to(dtype)
    state = from_hf_tensors(state)

    with torch.device("meta"):
        model = Transformer(cfg)
    expected = set(model.state_dict())
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise ValueError(
            f"{path}: checkpoint does not match the config "
            f"(missing: {sorted(missing)[:5]}, unexpected: {sorted(unexpected)[:5]})"
        )
    model.load_state_dict(state, assign=True)
    model.init_buffers()  # the RoPE table is still on the meta device
    return model.to(device)
