"""Periodic and final checkpoints, with everything a bit-exact resume needs.

A checkpoint is never written while an incident is open (the last step was skipped by a guard),
and never with non-finite weights or optimizer state (`save_checkpoint` refuses; the run stops
and keeps its last good checkpoint): the state a checkpoint records must be worth returning to.
"""

from __future__ import annotations

from pathlib import Path

from crucible.train import checkpoint as ckpt
from crucible.train.callbacks.base import Callback
from crucible.train.errors import Diverged
from crucible.train.state import Run, StepResult


class CheckpointCallback(Callback):
    def save(self, run: Run, step: int) -> Path | None:
        try:
            path = self._save(run, step)
        except ckpt.NonFiniteCheckpointError as e:
            # The update that did this looked finite; the guards cannot undo it, so the run
            # stops here and --resume continues from the last good checkpoint.
            run.log("incident", step, kind="nonfinite_state", action="stop", detail=str(e))
            run.stop = Diverged(f"{e}; the last good checkpoint is kept")
            return None
        run.last_saved = step
        return path

    def _save(self, run: Run, step: int) -> Path:
        return ckpt.save_checkpoint(
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
            milestone_every=run.cfg.checkpoint.milestone_every,
            async_save=run.cfg.checkpoint.async_save,
            warn=lambda message: run.say(f"[yellow]checkpoint:[/] {message}"),
        )

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
