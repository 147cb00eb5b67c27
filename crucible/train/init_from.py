"""The model a post-training run starts from: a Crucible run, one of its checkpoints, or an HF dir.

`load_base(path)` returns the model's config, its weights and its tokenizer file, after checking
that everything is there (a ConfigError naming what is missing otherwise). Only safetensors are
read; nothing is unpickled.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from crucible.config import ConfigError, ModelConfig, load_config
from crucible.model import Transformer
from crucible.train.checkpoint import CheckpointError, latest_checkpoint, load_model_weights
from crucible.train.checkpoint_manifest import verify_checkpoint


@dataclass
class Base:
    path: Path  # what was given
    source: Path  # the checkpoint or HF directory the weights come from
    model_cfg: ModelConfig
    state: dict[str, torch.Tensor]
    tokenizer_path: Path

    def build(self, device: torch.device | str = "cpu") -> Transformer:
        """A fresh Transformer holding the base weights (fp32, train mode)."""
        model = Transformer(self.model_cfg)
        model.load_state_dict(self.state, strict=True)
        return model.to(device)


def _from_checkpoint(given: Path, run_dir: Path, ckpt: Path) -> Base:
    cfg = load_config(run_dir / "config.yaml")
    problems = verify_checkpoint(ckpt, "size")
    if problems:
        raise ConfigError(f"init_from {ckpt}: damaged checkpoint: {problems[0]}")
    model = Transformer(cfg.model)
    try:
        load_model_weights(ckpt, model)
    except CheckpointError as e:
        raise ConfigError(f"init_from {e}") from None
    tok = run_dir / "tokenizer.json"
    if not tok.is_file():
        raise ConfigError(f"init_from {run_dir}: no tokenizer.json in the run directory")
    return Base(given, ckpt, cfg.model, model.state_dict(), tok)


def load_base(path: str | Path, where: str = "init_from") -> Base:
    """Config, weights and tokenizer of a run directory, a step_N directory or an HF directory."""
    p = Path(path)
    if not p.is_dir():
        raise ConfigError(f"{where} {p}: no such directory (a run, checkpoint or HF directory)")
    if (p / "config.yaml").is_file():  # a run directory: its newest intact checkpoint
        ckpt = latest_checkpoint(p / "checkpoints", "size")
        if ckpt is None:
            raise ConfigError(f"{where} {p}: the run has no complete checkpoint")
        return _from_checkpoint(p, p, ckpt)
    if (p / "state.json").is_file() and (p.parent.parent / "config.yaml").is_file():
        return _from_checkpoint(p, p.parent.parent, p)
    if (p / "config.json").is_file():
        from crucible.model.hf import load_hf

        try:
            model = load_hf(p)
        except (ValueError, KeyError, OSError) as e:
            raise ConfigError(f"{where} {p}: cannot load the HF model ({e})") from None
        tok = p / "tokenizer.json"
        if not tok.is_file():
            raise ConfigError(f"{where} {p}: no tokenizer.json in the HF directory")
        return Base(p, p, model.cfg, model.state_dict(), tok)
    raise ConfigError(
        f"{where} {p}: not a run directory (config.yaml), a checkpoint (state.json) or an HF "
        "directory (config.json)"
    )
