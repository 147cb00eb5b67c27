"""The pretraining loop, in one place, top to bottom.

    setup (checks, run directory, model, DDP/FSDP2, optimizer, loader, resume)
    -> while steps remain: callbacks' on_step_start, train_step, callbacks' on_step_end
    -> callbacks' on_train_end -> summary.json (the mark of a finished run)

The step (`step.py`) is micro-batches, backward, guards, clip and update. Everything else is a
callback, one module each in `callbacks/`: logging, validation, checkpoints, monitoring, spike
handling, signals, fault injection; callers add their own (in-loop evaluation lives in
`crucible.evaluate`). The same function runs in one process or under `torchrun`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from crucible.config import ConfigError, RunConfig
from crucible.data.loader import eval_batches
from crucible.data.mixture import MixtureLoader
from crucible.data.prepare import check_tokenizer_vocab, prepare_data
from crucible.data.shards import ShardSet
from crucible.plan.params import count_params
from crucible.tokenizer.train import EOS_TOKEN, load_tokenizer, token_byte_lengths
from crucible.train import chaos
from crucible.train import checkpoint as ckpt
from crucible.train.callbacks.base import Callback
from crucible.train.callbacks.checkpointing import CheckpointCallback
from crucible.train.callbacks.faults import FaultInjector
from crucible.train.callbacks.logging import LoggingCallback
from crucible.train.callbacks.monitoring import MonitorCallback
from crucible.train.callbacks.plan_check import PlanCheckCallback
from crucible.train.callbacks.signals import SignalCallback
from crucible.train.callbacks.spikes import SpikeGuard
from crucible.train.callbacks.validation import ValidationCallback
from crucible.train.distributed import barrier, init_distributed
from crucible.train.metrics import MetricsLogger, console, peak_flops
from crucible.train.optim import build_optimizer
from crucible.train.parallelize import build_model, load_initial_weights
from crucible.train.preflight import preflight_at_start
from crucible.train.setup import (
    TrainInputs,
    autocast_dtype,
    check_output_dir,
    check_resume,
    make_loader,
    resolve_device,
    write_run_files,
)
from crucible.train.state import Run
from crucible.train.step import train_step

# Re-exported: older callers import these from here.
__all__ = ["TrainResult", "autocast_dtype", "make_loader", "resolve_device", "train"]


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    val: dict[str, float] | None
    checkpoint: Path | None
    tokenizer_path: Path


def train(
    cfg: RunConfig,
    resume: bool = False,
    quiet: bool = False,
    callbacks: Sequence[Callback] = (),
    inputs: TrainInputs | None = None,
) -> TrainResult:
    """Train `cfg` (continuing its run directory with `resume`); `callbacks` run after ours.

    `inputs` replaces the pretraining data and objective (SFT uses it); None: pretraining.
    """
    run = setup(cfg, resume, quiet, inputs)
    # Order matters: faults act first; the guard decides before logging and saving; a rollback
    # (spike guard, on_step_end) comes after the step's own logging and before a signal stop.
    run.callbacks = [
        FaultInjector(run),
        LoggingCallback(),
        *([MonitorCallback(run)] if cfg.monitor.enabled else []),
        PlanCheckCallback(),
        run.callbacks[0],  # validation, built in setup
        *callbacks,
        CheckpointCallback(),
        SpikeGuard(run),
        SignalCallback(),
    ]
    return loop(run, resume)


def loop(run: Run, resume: bool) -> TrainResult:
    """Resume (or start), then step until done or stopped: the loop every command shares."""
    resume_from(run, resume)
    for cb in run.callbacks:
        cb.on_train_start(run)
    try:
        while run.step < run.end_step and run.stop is None:
            for cb in run.callbacks:
                cb.on_step_start(run)
            result = train_step(run, run.step)
            run.step = result.step
            for cb in run.callbacks:
                cb.on_step_end(run, result)
            chaos.point("step", run.step)
        for cb in run.callbacks:
            cb.on_train_end(run)
    finally:
        for cb in run.callbacks:
            if hasattr(cb, "close"):  # also after a crash: e.g. signal handlers are restored
                cb.close()
        if run.metrics is not None:
            run.metrics.close()
        if hasattr(run.loader, "close"):
            run.loader.close()
    ckpt.finalize_pending()  # an async save completes before the run says it stopped or finished
    if run.stop is not None:
        barrier()
        raise run.stop
    return finish(run)


def setup(cfg: RunConfig, resume: bool, quiet: bool, inputs: TrainInputs | None = None) -> Run:
    device = resolve_device(cfg.train.device)
    info = init_distributed(cfg, device.type)  # checks the layout first, on every rank
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
    if cfg.train.threads is not None:
        if cfg.train.threads < 1:
            raise ConfigError(f"train.threads {cfg.train.threads}: must be at least 1 (or null)")
        torch.set_num_threads(cfg.train.threads)
    say = console.print if (info.is_main and not quiet) else (lambda *a, **k: None)
    run_dir = cfg.run_dir

    # ---- checks: everything that can be wrong, before the run directory is touched
    check_output_dir(run_dir, resume)  # every rank, before anyone creates the directory
    # Ranks of one TP group read the same batches: the data is split over data-parallel ranks.
    micro, world = cfg.train.micro_batch_size, info.dp_size
    latest = check_resume(cfg, run_dir) if resume else None
    end_step = cfg.train.stop_at or cfg.train.steps  # train.stop_at ends early (a trunk)
    init_from = Path(cfg.checkpoint.init_from) if cfg.checkpoint.init_from else None
    if init_from is not None and latest is None:
        try:
            init_step = ckpt.check_init_from(init_from, world)["step"]
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if init_step >= end_step:
            raise ConfigError(
                f"checkpoint.init_from {init_from} is at step {init_step}; this run stops at "
                f"step {end_step}: nothing to train"
            )
    if cfg.data.tokenizer is not None and cfg.data.train_shards is None and not cfg.data.sources:
        # the corpus is built with this tokenizer: a bad file fails here, not after the build
        check_tokenizer_vocab(cfg.data.tokenizer, cfg.model.vocab_size)
    barrier()
    if inputs is None:
        if info.is_main:
            data = prepare_data(cfg.data, cfg.model.vocab_size, cfg.train.seq_len)
        barrier()
        if not info.is_main:
            data = prepare_data(cfg.data, cfg.model.vocab_size, cfg.train.seq_len)
        # prepare_data has checked the shards against the tokenizer and the tokenizer against
        # the model
        tokenizer_path = data.tokenizer_path
    else:
        tokenizer_path = inputs.tokenizer_path
    tokenizer = load_tokenizer(tokenizer_path)
    token_bytes = torch.from_numpy(token_byte_lengths(tokenizer)).long()
    if token_bytes.numel() < cfg.model.vocab_size:  # pad rows the tokenizer never produces
        token_bytes = torch.cat(
            [token_bytes, torch.zeros(cfg.model.vocab_size - token_bytes.numel(), dtype=torch.long)]
        )
    eos = tokenizer.token_to_id(EOS_TOKEN)  # None: the shards' metadata names it
    if inputs is None:  # the fast checks; a fail stops here (post-training checks its own)
        preflight_at_start(cfg, info, device, data, quiet)

    # ---- the run directory
    if info.is_main:
        write_run_files(cfg, run_dir, tokenizer_path)
        if inputs is not None and inputs.write_files is not None:
            inputs.write_files(run_dir)
    barrier()

    # ---- model, wrapper, optimizer, loader
    amp = autocast_dtype(cfg.train.dtype, device)
    model = build_model(cfg, info, device, amp)  # TP, checkpointing, compile, FSDP2 / DDP
    if inputs is not None and inputs.init_model is not None:
        load_initial_weights(model, cfg, info, inputs.init_model)  # e.g. an SFT run's base
    if inputs is None:
        val_batches = eval_batches(
            ShardSet(data.val_dir), cfg.train.seq_len, micro, cfg.train.val_batches,
            info.dp_rank, world, eos_id=eos,
        )  # fmt: skip
        loader = make_loader(cfg, data, info.dp_rank, world, eos)
    else:
        val_batches = inputs.val_batches(info.dp_rank, world)
        loader = inputs.make_loader(info.dp_rank, world)
    if cfg.train.prefetch and hasattr(loader, "enable_prefetch"):
        loader.enable_prefetch(pin_memory=device.type == "cuda")
    run = Run(
        cfg=cfg,
        info=info,
        device=device,
        amp=amp,
        model=model,
        optimizer=build_optimizer(model, cfg.optim, device),
        loader=loader,
        run_dir=run_dir,
        grad_accum=cfg.train.global_batch_size // (micro * world),
        end_step=end_step,
        metrics=MetricsLogger(
            run_dir, cfg.train.tensorboard, cfg.train.wandb_project, cfg.model_dump(mode="json")
        )
        if info.is_main
        else None,
        say=say,
    )
    run.callbacks = [ValidationCallback(val_batches, token_bytes)]
    run.tokenizer = tokenizer
    run.objective = inputs.objective if inputs is not None else None
    return run


def resume_from(run: Run, resume: bool) -> None:
    """Continue the run's own latest intact checkpoint, or start from `checkpoint.init_from`."""
    cfg, say = run.cfg, run.say
    latest = ckpt.find_resume_checkpoint(run.checkpoints) if resume else None
    if latest is not None:
        state = ckpt.load_checkpoint(latest, run.model, run.optimizer)
        run.loader.load_state_dict(state["loader"])
        run.load_callback_states(state.get("callbacks", {}))
        run.step = run.start_step = run.last_saved = state["step"]
        run.resumed = True
        attempt = os.environ.get("CRUCIBLE_SUPERVISOR_ATTEMPT")
        extra = {"attempt": int(attempt)} if attempt else {}
        if run.metrics:
            run.metrics.truncate_after(run.step)
            run.metrics.log("resume", run.step, checkpoint=latest.name, **extra)
        say(f"[bold]resumed[/] from {latest} at step {run.step}")
    elif cfg.checkpoint.init_from:
        init_from = Path(cfg.checkpoint.init_from)
        # Weights, optimizer and RNG of another run; the data position is this run's own loader
        # at that step (a pure function of the step), so the data config may differ.
        # Hyperparameters (betas, weight decay, ...) are this run's; only the state is loaded.
        groups = [{k: v for k, v in g.items() if k != "params"} for g in run.optimizer.param_groups]
        state = ckpt.load_checkpoint(init_from, run.model, run.optimizer)
        for group, ours in zip(run.optimizer.param_groups, groups):
            group.update(ours)
        run.step = run.start_step = state["step"]
        run.loader.step = run.step
        if run.metrics:
            run.metrics.truncate_after(run.step)  # a crashed first attempt logged nothing to keep
            run.metrics.log("init_from", run.step, checkpoint=str(init_from))
        say(f"[bold]initialised[/] from {init_from} at step {run.step}")
    else:
        if run.metrics:
            run.metrics.truncate_after(-1)  # killed before its first checkpoint: start clean
        if resume:
            say(f"no complete checkpoint in {run.checkpoints}; starting from step 0")
    if run.metrics is not None:
        run.metrics.open_mirrors(resume_step=run.step)

    if isinstance(run.loader, MixtureLoader) and run.info.is_main:
        plan = run.loader.accounting(cfg.train.steps)
        tmp = run.run_dir / "mixture.json.tmp"
        tmp.write_text(json.dumps(plan, indent=1))
        tmp.replace(run.run_dir / "mixture.json")
        for row in plan:
            say(
                f"  mixture stage {row['stage']}: {row['source']} {row['share']:.1%} "
                f"({row['tokens']:,} tokens, {row['epochs_cumulative']:.2f} epochs by stage end)"
            )
    n_params = count_params(cfg.model).total
    _, device_name = peak_flops(run.device.type, run.device.index or 0)
    say(
        f"[bold]crucible train[/] {cfg.name}: {n_params / 1e6:.2f}M params, "
        f"{cfg.train.steps} steps x {cfg.train.tokens_per_step:,} tokens, "
        f"{run.info.world_size} process(es), grad accum {run.grad_accum}, {device_name}, "
        f"{run.amp or torch.float32}" + (", compiled" if cfg.train.compile else "")
    )
    say(f"run directory: {run.run_dir}")


def finish(run: Run) -> TrainResult:
    """stopped.json after a train.stop_at trunk, summary.json after the last step."""
    cfg, run_dir = run.cfg, run.run_dir
    tokenizer = run_dir / "tokenizer.json"
    last = ckpt.step_dir(run.checkpoints, run.step)
    if run.end_step < cfg.train.steps:
        # No validation and no summary.json: the run is not finished (resuming without
        # stop_at continues it).
        if run.info.is_main:
            _write_json(run_dir / "stopped.json", {"name": cfg.name, "step": run.step,
                                                   "checkpoint": last.name})  # fmt: skip
        barrier()
        return TrainResult(run_dir, run.step, None, last, tokenizer)
    if run.info.is_main:
        summary = {
            "name": cfg.name,
            "step": run.step,
            "tokens": run.step * cfg.train.tokens_per_step,
            "params": count_params(cfg.model).total,
            "checkpoint": last.name,
            **(run.val or {}),
        }
        _write_json(run_dir / "summary.json", summary)
    barrier()
    return TrainResult(run_dir, run.step, run.val, last, tokenizer)


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)
