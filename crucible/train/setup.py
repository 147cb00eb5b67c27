"""Everything before the first step: checks, the run directory, model, optimizer and loader.

Order matters: every check that can fail runs before the run directory is touched, so a refused
start (bad config, changed shape on --resume, unwritable output) never damages an existing run.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from crucible.config import ConfigError, RunConfig, dump_config, load_config
from crucible.data.loader import PretrainLoader
from crucible.data.mixture import MixtureLoader, Stage
from crucible.data.prepare import PreparedData
from crucible.data.shards import ShardSet
from crucible.model import Transformer
from crucible.train import checkpoint as ckpt

# Settings a resumed run must share with its checkpoints: they fix the weights' shapes, the
# data order and the meaning of a step. Everything else (steps, logging, eval, ...) may change.
RESUME_FIXED = (
    "model",
    "seed",
    "train.seq_len",
    "train.global_batch_size",
    "data.corpus",
    "data.max_corpus_mb",
    "data.train_shards",
    "data.sources",
    "data.stages",
    "distributed.tp",  # sharded checkpoints are resumed with the layout that wrote them
    "sft",
)


@dataclass
class TrainInputs:
    """What a run trains on when it is not pretraining on shards (SFT, for one).

    `setup` takes these instead of preparing pretraining data: the tokenizer, the loader and
    validation batches of each rank, the objective, and optionally weights to start from and
    files to add to the run directory. Resume, checkpoints, callbacks and DDP/FSDP are unchanged.
    """

    tokenizer_path: Path
    make_loader: Callable[[int, int], Any]  # (rank, world size) -> a loader with .step/state
    val_batches: Callable[[int, int], list]  # (rank, world size) -> this rank's batches
    objective: Callable[..., Any] | None = None  # (run, batch) -> step.Loss
    init_model: Callable[[torch.nn.Module], None] | None = None  # unwrapped, before DDP/FSDP
    write_files: Callable[[Path], None] | None = None  # main process, into the run directory


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda: no CUDA device is available (use auto or cpu)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("train.device=mps: MPS is not available on this machine")
    return device


def autocast_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast where the hardware does bf16 natively; None means plain fp32."""
    if setting == "fp32":
        return None
    if setting == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if device.type == "cpu":
        return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else None
    return None


def make_loader(
    cfg: RunConfig, data: PreparedData, rank: int, world: int, eos: int | None
) -> PretrainLoader | MixtureLoader:
    """One shard set, or a staged mixture of named sources (data.sources + data.stages)."""
    common = dict(
        seq_len=cfg.train.seq_len,
        global_batch_size=cfg.train.global_batch_size,
        micro_batch_size=cfg.train.micro_batch_size,
        rank=rank,
        world_size=world,
        seed=cfg.seed,
        eos_id=eos,
    )
    if data.sources:
        stages = [Stage(s.name, s.weights, s.steps) for s in cfg.data.stages]
        sources = {name: ShardSet(path) for name, path in data.sources.items()}
        return MixtureLoader(sources, stages, **common)
    return PretrainLoader(ShardSet(data.train_dir), **common)


def init_model(cfg: RunConfig, device: torch.device) -> Transformer:
    """The initial weights, seeded by `cfg.seed` alone: identical on every rank (FSDP2 keeps
    each rank's own shard of them; preflight checks that the ranks agree)."""
    torch.manual_seed(cfg.seed)
    with torch.device(device):  # initialise in place: no full-size CPU copy of a large model
        return Transformer(cfg.model)


def compile_model(model: torch.nn.Module, per_block: bool = False) -> None:
    """torch.compile in place (state-dict names unchanged).

    The whole model compiles into one graph, loss included, which fuses best. Under FSDP2 or TP
    every block is compiled on its own (as torchtitan does): FSDP2's hooks sit between blocks.
    """
    if per_block:
        for block in model.layers:
            block.compile()
    else:
        model.compile()


def check_output_dir(run_dir: Path, resume: bool) -> None:
    """Fail before any work when the run directory cannot be written or would be clobbered."""
    parent = run_dir.parent
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"output directory {parent}: not writable (checked {probe})")
    # Hidden files (a command's marker) do not make a directory a run.
    if (
        run_dir.exists()
        and not resume
        and any(not p.name.startswith(".") for p in run_dir.iterdir())
    ):
        raise ConfigError(
            f"run directory {run_dir} already exists: pass --resume to continue it, "
            "or choose another name= / out_dir="
        )


def _get(d: dict, dotted: str):
    for part in dotted.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


def check_resume(cfg: RunConfig, run_dir: Path) -> Path | None:
    """The checkpoint a --resume continues from, after checking the config against the run.

    Refuses, before anything is written: a changed model shape, batch, sequence length, seed or
    data; `train.steps` or `train.stop_at` before the latest checkpoint.
    """
    latest = ckpt.latest_checkpoint(run_dir / "checkpoints")
    saved_path = run_dir / "config.yaml"
    if saved_path.is_file():
        try:
            saved = load_config(saved_path).model_dump(mode="json")
        except ConfigError as e:
            raise ConfigError(f"--resume: cannot read the run's config: {e}") from None
        ours = cfg.model_dump(mode="json")
        changed = [k for k in RESUME_FIXED if _get(saved, k) != _get(ours, k)]
        if changed and latest is not None:
            detail = "; ".join(f"{k}: {_diff(_get(saved, k), _get(ours, k))}" for k in changed)
            raise ConfigError(
                f"--resume {run_dir}: the config changed what the checkpoints depend on "
                f"({detail}). Resume with the original settings, or start a new run "
                "(checkpoint.init_from= forks from a checkpoint with new data or schedule)"
            )
    if latest is None:
        return None
    step = ckpt.read_state(latest)["step"]
    if cfg.train.steps < step:
        raise ConfigError(
            f"--resume: train.steps {cfg.train.steps} is before the latest checkpoint "
            f"{latest.name} (step {step}); a run cannot go backwards"
        )
    if cfg.train.stop_at is not None and cfg.train.stop_at < step:
        raise ConfigError(
            f"--resume: train.stop_at {cfg.train.stop_at} is before the latest checkpoint "
            f"{latest.name} (step {step}); fork an earlier checkpoint with checkpoint.init_from"
        )
    return latest


def _diff(a, b) -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        return ", ".join(f"{k} {a.get(k)!r} -> {b.get(k)!r}" for k in keys[:4])
    return f"{a!r} -> {b!r}"


def write_run_files(cfg: RunConfig, run_dir: Path, tokenizer_path: Path) -> None:
    """config.yaml and tokenizer.json, each replaced atomically; the run is unfinished now."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "summary.json").unlink(missing_ok=True)
    (run_dir / "stopped.json").unlink(missing_ok=True)
    tmp = run_dir / "config.yaml.tmp"
    tmp.write_text(dump_config(cfg))
    tmp.replace(run_dir / "config.yaml")
    tmp = run_dir / "tokenizer.json.tmp"
    shutil.copyfile(tokenizer_path, tmp)
    tmp.replace(run_dir / "tokenizer.json")
