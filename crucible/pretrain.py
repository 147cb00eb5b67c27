"""Pretraining as the commands run it: the training loop plus in-loop evaluation.

The loop (`crucible.train`) knows nothing about evaluation; this is the one place that puts the
two together, for `crucible train`, the quickstart and ablation suites.
"""

from __future__ import annotations

from crucible.config import RunConfig
from crucible.evaluate.inloop import InLoopEvalCallback, eval_interval
from crucible.train.trainer import TrainResult, train


def run_pretraining(cfg: RunConfig, resume: bool = False, quiet: bool = False) -> TrainResult:
    callbacks = []
    if eval_interval(cfg.eval, cfg.train.tokens_per_step):
        callbacks.append(InLoopEvalCallback())
    return train(cfg, resume=resume, quiet=quiet, callbacks=callbacks)
