"""Shared inputs of the post-training command tests: a tiny base run and a config writer."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml


def train_base(small_base: list[str], out: Path, name: str = "base", steps: int = 2) -> Path:
    """A finished tiny pretraining run (a few seconds): the starting point of every command."""
    from crucible.config import load_config
    from crucible.train.trainer import train

    cfg = load_config("tiny", [*small_base, f"out_dir={out}", f"name={name}",
                               f"train.steps={steps}", "train.val_every=0", "model.max_seq_len=256",
                               "checkpoint.every=0", "train.dtype=fp32"])  # fmt: skip
    train(cfg, quiet=True)
    return out / name


def write_config(path: Path, section: str, options: dict[str, Any], **top: Any) -> Path:
    data: dict[str, Any] = {
        "name": top.pop("name", section),
        "out_dir": str(top.pop("out_dir")),
        "seed": top.pop("seed", 0),
        "train": {"steps": 3, "global_batch_size": 4, "micro_batch_size": 2, "log_every": 1,
                  "dtype": "fp32", "tensorboard": False, **top.pop("train", {})},
        "optim": {"lr": 1e-3, **top.pop("optim", {})},
        "schedule": {"kind": "constant", "warmup_steps": 0},
        "checkpoint": {"every": 0, **top.pop("checkpoint", {})},
        section: options,
        **top,
    }  # fmt: skip
    path.write_text(yaml.safe_dump(data))
    return path


def write_jsonl(path: Path, records: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def cli(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "crucible", *args], capture_output=True,
                          text=True, timeout=300)  # fmt: skip


def train_events(run_dir: Path) -> list[dict[str, Any]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == "train"]
