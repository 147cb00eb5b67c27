"""The training loop for post-training commands (dpo, grpo, distill): the pretraining loop's
step, callbacks, checkpoints and resume, with the model started from a base run or HF directory.

    prepare(cfg, section)  checks, base model, run directory, optimizer (one process)
    run_loop(run, ...)     the same loop as `crucible.train.trainer.train`: on_step_start,
                           train_step (which calls `run.objective` per micro-batch), on_step_end

A command builds its loader (a pure function of the step, for exact resumes) and its objective,
then hands them to `run_loop`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import ValidationError

from crucible.config import ConfigError, RunConfig, format_validation_error
from crucible.train.callbacks.base import Callback
from crucible.train.callbacks.checkpointing import CheckpointCallback
from crucible.train.callbacks.logging import LoggingCallback
from crucible.train.callbacks.signals import SignalCallback
from crucible.train.callbacks.spikes import SpikeGuard
from crucible.train.distributed import DistInfo, launched_by_torchrun
from crucible.train.init_from import Base, load_base
from crucible.train.metrics import MetricsLogger, console
from crucible.train.optim import build_optimizer
from crucible.train.setup import (
    autocast_dtype,
    check_output_dir,
    check_resume,
    resolve_device,
    write_run_files,
)
from crucible.train.state import Run
from crucible.train.trainer import TrainResult, loop


@dataclass
class Prepared:
    cfg: RunConfig  # with the base model's config in `model`
    base: Base
    device: torch.device
    say: Any


def prepare(cfg: RunConfig, section: str, resume: bool, quiet: bool) -> Prepared:
    """Every check that needs no model: section present, base model readable, output writable."""
    if launched_by_torchrun():
        raise ConfigError(f"crucible {section} runs in one process; start it without torchrun")
    sub = getattr(cfg, section)
    if sub is None:
        raise ConfigError(f"the config has no `{section}:` section (see docs/post-training.md)")
    if not sub.init_from:
        raise ConfigError(f"{section}.init_from: required (a run directory or an HF directory)")
    device = resolve_device(cfg.train.device)
    if cfg.train.threads is not None:
        torch.set_num_threads(cfg.train.threads)
    check_output_dir(cfg.run_dir, resume)
    base = load_base(sub.init_from, f"{section}.init_from")
    data = cfg.model_dump(mode="json")
    data["model"] = base.model_cfg.model_dump(mode="json")
    if data["train"]["seq_len"] > base.model_cfg.max_seq_len:
        data["train"]["seq_len"] = base.model_cfg.max_seq_len
    try:
        cfg = RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, f"{section} with the base model")) from None
    if resume:
        check_resume(cfg, cfg.run_dir)
    say = (lambda *a, **k: None) if quiet else console.print
    return Prepared(cfg, base, device, say)


def make_run(p: Prepared, loader: Any, objective: Any) -> Run:
    """The run directory, model (base weights), optimizer and metrics; nothing trained yet."""
    cfg = p.cfg
    write_run_files(cfg, cfg.run_dir, p.base.tokenizer_path)
    torch.manual_seed(cfg.seed)
    model = p.base.build(p.device).train()
    info = DistInfo()
    run = Run(
        cfg=cfg,
        info=info,
        device=p.device,
        amp=autocast_dtype(cfg.train.dtype, p.device),
        model=model,
        optimizer=build_optimizer(model, cfg.optim, p.device),
        loader=loader,
        run_dir=cfg.run_dir,
        grad_accum=cfg.train.global_batch_size // cfg.train.micro_batch_size,
        end_step=cfg.train.stop_at or cfg.train.steps,
        metrics=MetricsLogger(
            cfg.run_dir, cfg.train.tensorboard, cfg.train.wandb_project, cfg.model_dump(mode="json")
        ),  # fmt: skip
        say=p.say,
    )
    run.objective = objective
    return run


def run_loop(run: Run, resume: bool, callbacks: Sequence[Callback] = ()) -> TrainResult:
    """`crucible.train.trainer.loop` with the command's callbacks in the middle."""
    run.callbacks = [
        LoggingCallback(),
        *callbacks,
        CheckpointCallback(),
        SpikeGuard(run),
        SignalCallback(),
    ]
    return loop(run, resume)


def load_model_for(spec: str, where: str, device: torch.device) -> tuple[Base, torch.nn.Module]:
    """A frozen model (eval mode, no grad) from a run or HF directory: a teacher or a reference."""
    base = load_base(spec, where)
    model = base.build(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return base, model
