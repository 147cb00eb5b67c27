"""The run directory, read back: config, checkpoints, tokenizer and the trained model.

runs/<name>/config.yaml        resolved config (what was trained)
runs/<name>/tokenizer.json     the tokenizer the shards were made with
runs/<name>/metrics.jsonl      one JSON object per event (train, val, resume)
runs/<name>/checkpoints/step_N complete, verified checkpoints (see crucible.train.checkpoint)
runs/<name>/summary.json       written last: its presence marks a finished run
runs/<name>/loss.png, report.md, report.html, hf/   written by report and export
"""

from __future__ import annotations

from pathlib import Path

import torch

from crucible.config import ConfigError, RunConfig, load_config
from crucible.model import Transformer
from crucible.train.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_model_weights,
    verify_checkpoint,
)
from crucible.train.checkpoint_manifest import is_legacy
from crucible.train.checkpoint_store import default_warn


def run_config(run_dir: Path) -> RunConfig:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{run_dir}: not a run directory (no config.yaml)")
    return load_config(path)


def resolve_checkpoint(run_dir: Path, checkpoint: str | None = None) -> Path:
    """The named checkpoint, verified (an error if damaged), or the newest intact one (damaged
    newer ones are skipped with a warning naming the damaged file)."""
    run_dir = Path(run_dir)
    if checkpoint:
        path = Path(checkpoint)
        path = path if path.is_dir() else run_dir / "checkpoints" / checkpoint
        if not (path / "state.json").is_file():
            raise ConfigError(f"{path}: not a complete checkpoint")
        problems = verify_checkpoint(path)
        if problems:
            raise CheckpointError(f"{path}: damaged checkpoint: {problems[0]}")
        if is_legacy(path):
            default_warn(f"checkpoint {path} predates manifests (format 1): loading it unverified")
        return path
    latest = latest_checkpoint(run_dir / "checkpoints")
    if latest is None:
        raise ConfigError(f"{run_dir}: no complete checkpoint in {run_dir / 'checkpoints'}")
    return latest


def load_run_model(
    run_dir: Path, checkpoint: str | None = None, device: str = "cpu"
) -> tuple[Transformer, RunConfig, Path]:
    """The trained model of a run (latest checkpoint unless one is named), in eval mode."""
    cfg = run_config(run_dir)
    ckpt = resolve_checkpoint(run_dir, checkpoint)
    model = Transformer(cfg.model)
    load_model_weights(ckpt, model)
    return model.to(torch.device(device)).eval(), cfg, ckpt
