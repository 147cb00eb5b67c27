"""Held-out loss and bits-per-byte every `train.val_every` steps, and once at the end."""

from __future__ import annotations

import torch

from crucible.train.callbacks.base import Callback
from crucible.train.state import Run, StepResult
from crucible.train.validation import evaluate_loss


class ValidationCallback(Callback):
    def __init__(self, batches: list, token_bytes: torch.Tensor) -> None:
        self.batches, self.token_bytes = batches, token_bytes

    def validate(self, run: Run, step: int) -> dict[str, float]:
        if not self.batches:  # a run without held-out data (an SFT run without val_data)
            return {}
        val = evaluate_loss(run.model, self.batches, self.token_bytes, run.device, run.amp)
        run.log("val", step, tokens=step * run.tokens_per_step, **val)
        run.say(f"  [cyan]val[/] step {step}: loss {val['val_loss']:.4f}  bpb {val['val_bpb']:.4f}")
        run.val = val
        return val

    def on_step_end(self, run: Run, result: StepResult) -> None:
        every, done = run.cfg.train.val_every, result.step
        if every and done % every == 0 and done < run.cfg.train.steps:
            self.validate(run, done)

    def on_train_end(self, run: Run) -> None:
        if run.stop is None and run.step == run.cfg.train.steps:
            self.validate(run, run.step)  # the final validation, recorded in summary.json
