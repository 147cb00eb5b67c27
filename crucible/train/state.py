"""What the loop and its callbacks share: the run being trained and the result of one step."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from crucible.config import RunConfig
from crucible.train.distributed import DistInfo
from crucible.train.errors import TrainingStopped
from crucible.train.metrics import MetricsLogger


@dataclass
class StepResult:
    """One optimizer step, as every rank agrees on it (loss and norm are global)."""

    step: int  # optimizer steps completed, this one included (1-based)
    lr: float
    loss: float  # cross-entropy only (comparable with validation loss), mean over all ranks
    z_loss: float  # mean logsumexp^2, logged beside the loss
    grad_norm: float  # global, before clipping
    data_seconds: float  # waiting for batches
    compute_seconds: float  # forward, backward, clip, optimizer
    stop_requested: bool = False  # some rank was asked to stop (SIGTERM/SIGINT)
    skipped: str | None = None  # why the update was not applied, if it was not
    extra: dict[str, float] = field(default_factory=dict)  # the objective's other scalars

    @property
    def finite(self) -> bool:
        return math.isfinite(self.loss) and math.isfinite(self.grad_norm)


@dataclass
class Run:
    """The run being trained. Callbacks read it and may steer it (stop, lr scale, step)."""

    cfg: RunConfig
    info: DistInfo
    device: torch.device
    amp: torch.dtype | None
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    loader: Any  # PretrainLoader | MixtureLoader: a pure function of `loader.step`
    run_dir: Path
    grad_accum: int
    end_step: int  # the last step this invocation trains (train.stop_at or train.steps)
    metrics: MetricsLogger | None  # rank 0 only
    say: Callable[..., None]  # console output, rank 0 only (and not when quiet)
    step: int = 0  # optimizer steps completed; a rollback moves it back
    start_step: int = 0
    resumed: bool = False  # continues its own checkpoint (not a fresh start or init_from)
    lr_scales: dict[str, float] = field(default_factory=dict)  # named LR multipliers
    stop: TrainingStopped | None = None  # set by a callback: the loop ends after this step
    stop_signal: int | None = None  # SIGTERM/SIGINT received by this process
    last_saved: int | None = None
    val: dict[str, float] | None = None
    callbacks: list[Any] = field(default_factory=list)
    tokenizer: Any = None  # a tokenizers.Tokenizer, for callers' callbacks (in-loop eval)
    objective: Callable[..., Any] | None = None  # (run, batch) -> step.Loss; None: pretraining

    @property
    def checkpoints(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.train.tokens_per_step

    @property
    def lr_multiplier(self) -> float:
        return math.prod(self.lr_scales.values()) if self.lr_scales else 1.0

    def log(self, event: str, step: int, **values: Any) -> None:
        if self.metrics is not None:
            self.metrics.log(event, step, **values)

    def callback_states(self) -> dict[str, Any]:
        """State of every callback that has one, for the checkpoint (bit-exact resume)."""
        return {
            type(cb).__name__: cb.state_dict() for cb in self.callbacks if hasattr(cb, "state_dict")
        }

    def load_callback_states(self, states: dict[str, Any]) -> None:
        for cb in self.callbacks:
            name = type(cb).__name__
            if hasattr(cb, "load_state_dict") and name in states:
                cb.load_state_dict(states[name])
