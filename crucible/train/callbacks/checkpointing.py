"""Periodic and final checkpoints, with everything a bit-exact resume needs.

A checkpoint is never written while an incident is open (the last step was skipped by a guard),
and never with non-finite weights: the state it records must be one worth returning to.
"""

from __future__ import annotations

from pathlib import Path

import torch

from crucible.train import checkpoint as ckpt
from crucible.train.callbacks.base import Callback
from crucible.train.distributed import all_reduce_sum
from crucible.train.errors import Diverged
from crucible.train.state import Run, StepResult


def nonfinite_tensor(run: Run) -> str | None:
    """Name of the first parameter or optimizer-state tensor that is not finite, if any.

    Each rank checks its own shards (FSDP2 DTensors are checked locally); the verdict is summed
    over ranks so that every rank refuses the same save.
    """
    names, flags = [], []

    def check(name: str, t: torch.Tensor) -> None:
        local = t.to_local() if hasattr(t, "to_local") else t
        names.append(name)
        flags.append(~torch.isfinite(local.detach()).all())

    for name, p in run.model.named_parameters():
        check(name, p)
    for i, group in enumerate(run.optimizer.param_groups):
        for j, p in enumerate(group["params"]):
            for k, v in run.optimizer.state.get(p, {}).items():
                if isinstance(v, torch.Tensor) and v.is_floating_point():
                    check(f"optimizer group {i} param {j} {k}", v)
    if not flags:
        return None
    bad = all_reduce_sum(torch.stack(flags).double().tolist(), run.device)
    return next((n for n, b in zip(names, bad) if b), None)


class CheckpointCallback(Callback):
    def save(self, run: Run, step: int) -> Path:
        bad = nonfinite_tensor(run)
        if bad is not None:
            raise ckpt.NonFiniteCheckpointError(
                f"refusing to save checkpoint step {step}: {bad} is not finite"
            )
        path = ckpt.save_checkpoint(
            run.checkpoints,
            step,
            run.model,
            run.optimizer,
            {
                "loader": run.loader.state_dict(),
                "tokens_seen": step * run.tokens_per_step,
                "world_size": run.info.world_size,
                "strategy": run.cfg.distributed.strategy if run.info.enabled else "single",
                "callbacks": run.callback_states(),
            },
            run.cfg.checkpoint.keep_last,
        )
        run.last_saved = step
        return path

    def on_step_end(self, run: Run, result: StepResult) -> None:
        every, done = run.cfg.checkpoint.every, result.step
        if result.skipped or not every or done % every or done >= run.cfg.train.steps:
            return
        if done == run.end_step:
            return  # saved at the end of the invocation (train.stop_at)
        self.save(run, done)

    def on_train_end(self, run: Run) -> None:
        if isinstance(run.stop, Diverged):
            return  # nothing worth keeping since the last good checkpoint
        if run.last_saved != run.step and run.step > 0:
            self.save(run, run.step)
