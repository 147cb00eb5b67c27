"""Open whatever PATH names as an EvalLM: a run directory, one of its checkpoints, or an HF dir."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from crucible.config import ConfigError
from crucible.evaluate.lm import HFLM, CrucibleLM, EvalLM, TextTokenizer


def _checkpoint_info(ckpt: Path) -> dict[str, Any]:
    from crucible.train.checkpoint import read_state

    state = read_state(ckpt)
    return {"checkpoint": ckpt.name, "step": state.get("step"), "tokens": state.get("tokens_seen")}


def load_eval_model(
    path: str | Path,
    checkpoint: str | None = None,
    device: str = "cpu",
    backend: str = "auto",
) -> tuple[EvalLM, dict[str, Any]]:
    """(model, provenance) for a run dir, a checkpoint dir, or a local HF causal-LM dir.

    backend for HF dirs: "transformers" (any AutoModelForCausalLM, the default) or "crucible"
    (our Transformer through `load_hf`; llama/smollm3/qwen3 only).
    """
    from crucible.runs import load_run_model, resolve_checkpoint
    from crucible.tokenizer.train import load_tokenizer

    path = Path(path)
    if (path / "state.json").is_file() and not (path / "config.yaml").is_file():
        checkpoint, path = str(path.resolve()), path.resolve().parent.parent
    if (path / "config.yaml").is_file():
        ckpt = resolve_checkpoint(path, checkpoint)
        model, cfg, ckpt = load_run_model(path, str(ckpt), device)
        tok = TextTokenizer.from_tokenizers(load_tokenizer(path / "tokenizer.json"))
        lm = CrucibleLM(model, tok, cfg.model, device, name=f"{path.name}/{ckpt.name}")
        info = {"model": str(path), "kind": "crucible-run", **_checkpoint_info(ckpt)}
        return lm, info
    if (path / "config.json").is_file():
        return _load_hf_dir(path, device, backend)
    raise ConfigError(
        f"{path}: not a run directory (config.yaml), a checkpoint (state.json) or a Hugging Face "
        "model directory (config.json)"
    )


def _hf_tokenizer(path: Path) -> TextTokenizer:
    if (path / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        return TextTokenizer.from_tokenizers(Tokenizer.from_file(str(path / "tokenizer.json")))
    from transformers import AutoTokenizer

    return TextTokenizer.from_transformers(
        AutoTokenizer.from_pretrained(path, local_files_only=True)
    )


def _load_hf_dir(path: Path, device: str, backend: str) -> tuple[EvalLM, dict[str, Any]]:
    tok = _hf_tokenizer(path)
    info = {"model": str(path), "kind": "hf", "checkpoint": None, "step": None, "tokens": None}
    if backend == "crucible":
        from crucible.model.hf import load_hf

        model = load_hf(path, device=device).eval()
        info["kind"] = "hf-crucible"
        return CrucibleLM(model, tok, model.cfg, device, name=path.name), info
    if backend not in ("auto", "transformers"):
        raise ValueError(f"backend must be auto, transformers or crucible, got {backend!r}")
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, local_files_only=True
        )
    except (OSError, ValueError, KeyError) as e:
        cfg = json.loads((path / "config.json").read_text())
        raise ConfigError(
            f"{path}: transformers cannot load this model ({cfg.get('model_type')}): {e}"
        ) from None
    return HFLM(model.to(device).eval(), tok, device, name=path.name), info
