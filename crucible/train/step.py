"""One optimizer step: micro-batches, backward, global statistics, guards, clip, update.

Guards (callbacks with `check_step`) see the step's global loss and grad norm before the update
and may veto it; a vetoed update changes neither weights nor optimizer state. Every rank takes
the same decision because it is made from all-reduced values.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from crucible.model.moe import update_router_bias
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


@dataclass
class Loss:
    """What an objective returns for one micro-batch."""

    loss: torch.Tensor  # what backward differentiates (already including any auxiliary terms)
    logged: dict[str, torch.Tensor]  # detached scalars, averaged over micro-batches and ranks;
    # "loss" is the headline number (pretraining: cross-entropy alone, comparable with val loss)


def pretraining_loss(run: Run, batch) -> Loss:
    """Next-token cross-entropy; the z-loss and MoE auxiliary terms are trained on but logged
    beside the loss, so that `loss` compares with the validation loss."""
    out = run.model(batch.tokens, batch.targets, doc_ids=batch.doc_ids)
    z = out.z_loss.detach() if out.z_loss is not None else out.loss.new_zeros(())
    aux = {k: v.detach() for k, v in out.aux.items()}  # MoE: moe_loss is their weighted sum
    ce = out.loss.detach() - run.cfg.model.z_loss * z - aux.get("moe_loss", 0.0)
    return Loss(out.loss, {"loss": ce, "z_loss": z, **aux})


def train_step(run: Run, step: int) -> StepResult:
    """Train 0-based step `step`; return what happened (the update may have been skipped).

    The loss comes from `run.objective` (pretraining by default; SFT, preference and RL runs
    plug in theirs), one call per micro-batch.
    """
    model, device, amp = run.model, run.device, run.amp
    objective = run.objective or pretraining_loss
    lr = set_lr(run, step)
    t0 = time.perf_counter()
    batches = run.loader.next_step()
    for cb in run.callbacks:  # fault injection, per-source bookkeeping
        if hasattr(cb, "on_batches"):
            batches = cb.on_batches(run, step + 1, batches)
    t_data = time.perf_counter() - t0

    totals: dict[str, torch.Tensor] = {}
    for i, batch in enumerate(batches):
        batch = batch.to(device, non_blocking=True)  # pinned by the prefetcher on CUDA
        with sync_grads_context(model, last_micro_batch=i == len(batches) - 1):
            with torch.autocast(device.type, dtype=amp) if amp else nullcontext():
                out = objective(run, batch)
            (out.loss / run.grad_accum).backward()
        for k, v in out.logged.items():
            totals[k] = totals[k] + v.double() if k in totals else v.double()
    max_norm = run.cfg.optim.clip_grad if run.cfg.optim.clip_grad is not None else math.inf
    grad_norm = clip_grad_norm(model.parameters(), max_norm)
    if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
        grad_norm = grad_norm.full_tensor()
    keys = sorted(totals)
    stop = torch.tensor(float(run.stop_signal is not None), dtype=torch.float64, device=device)
    # One host read per step: the guards must decide before the update is applied. The stop
    # flag rides along, so every rank learns that one of them was signalled.
    flat = all_reduce_sum(torch.stack([*(totals[k] for k in keys), stop]).tolist(), device)
    n = run.grad_accum * run.info.world_size
    means = {k: v / n for k, v in zip(keys, flat)}
    result = StepResult(
        step=step + 1,
        lr=lr,
        loss=means.pop("loss"),
        z_loss=means.pop("z_loss", 0.0),
        grad_norm=float(grad_norm),
        data_seconds=t_data,
        compute_seconds=0.0,
        stop_requested=flat[-1] > 0,
        extra=means,
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
        update_router_bias(run.model)  # MoE aux-loss-free balancing; a no-op otherwise
    run.optimizer.zero_grad(set_to_none=True)
    result.compute_seconds = time.perf_counter() - t0 - t_data
    return result
