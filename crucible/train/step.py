"""One optimizer step: micro-batches, backward, global statistics, guards, clip, update.

Guards (callbacks with `check_step`) see the step's global loss and grad norm before the update
and may veto it; a vetoed update changes neither weights nor optimizer state. Every rank takes
the same decision because it is made from all-reduced values.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext

import torch

from crucible.train.distributed import all_reduce_sum, clip_grad_norm, sync_grads_context
from crucible.train.schedule import lr_at
from crucible.train.state import Run, StepResult


def set_lr(run: Run, step: int) -> float:
    """The schedule's LR at 0-based `step`, times the callbacks' multipliers (cooldown, faults)."""
    cfg = run.cfg
    lr = lr_at(step, cfg.train.steps, cfg.optim.lr, cfg.schedule) * run.lr_multiplier
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    return lr


def train_step(run: Run, step: int) -> StepResult:
    """Train 0-based step `step`; return what happened (the update may have been skipped)."""
    model, device, amp = run.model, run.device, run.amp
    lr = set_lr(run, step)
    t0 = time.perf_counter()
    batches = run.loader.next_step()
    for cb in run.callbacks:  # fault injection, per-source bookkeeping
        if hasattr(cb, "on_batches"):
            batches = cb.on_batches(run, step + 1, batches)
    t_data = time.perf_counter() - t0

    z_coef = run.cfg.model.z_loss
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # ce, z, stop flag
    for i, batch in enumerate(batches):
        batch = batch.to(device, non_blocking=True)  # pinned by the prefetcher on CUDA
        with sync_grads_context(model, last_micro_batch=i == len(batches) - 1):
            with torch.autocast(device.type, dtype=amp) if amp else nullcontext():
                out = model(batch.tokens, batch.targets, doc_ids=batch.doc_ids)
            (out.loss / run.grad_accum).backward()
        z = out.z_loss.detach().double() if out.z_loss is not None else sums.new_zeros(())
        # The logged loss is cross-entropy alone, so it compares with validation loss.
        sums[0] += out.loss.detach().double() - z_coef * z
        sums[1] += z
    max_norm = run.cfg.optim.clip_grad if run.cfg.optim.clip_grad is not None else math.inf
    grad_norm = clip_grad_norm(model.parameters(), max_norm)
    if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
        grad_norm = grad_norm.full_tensor()
    sums[2] = float(run.stop_signal is not None)  # every rank learns that one was signalled
    # One host read per step: the guards must decide before the update is applied.
    ce, z, stop = all_reduce_sum(sums.tolist(), device)
    n = run.grad_accum * run.info.world_size
    result = StepResult(
        step=step + 1,
        lr=lr,
        loss=ce / n,
        z_loss=z / n,
        grad_norm=float(grad_norm),
        data_seconds=t_data,
        compute_seconds=0.0,
        stop_requested=stop > 0,
    )
    if not result.finite:
        result.skipped = "non-finite loss or grad norm"
    for cb in run.callbacks:
        if result.skipped is None and hasattr(cb, "check_step"):
            result.skipped = cb.check_step(run, result)
    if result.skipped is None:
        for cb in run.callbacks:
            if hasattr(cb, "before_update"):
                cb.before_update(run, result)
        run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    result.compute_seconds = time.perf_counter() - t0 - t_data
    return result
