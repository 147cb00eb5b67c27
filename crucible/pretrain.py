"""Pretraining as the commands run it: the training loop plus in-loop evaluation.

The loop (`crucible.train`) knows nothing about evaluation; this is the one place that puts the
two together, for `crucible train`, `crucible preflight`, the quickstart and ablation suites.
"""

from __future__ import annotations

from crucible.config import RunConfig
from crucible.evaluate.inloop import InLoopEvalCallback, eval_interval
from crucible.evaluate.suite import build_task, expand
from crucible.train.distributed import DistInfo
from crucible.train.preflight import Check
from crucible.train.preflight_full import run_preflight
from crucible.train.trainer import TrainResult, train


def run_pretraining(cfg: RunConfig, resume: bool = False, quiet: bool = False) -> TrainResult:
    callbacks = []
    if eval_interval(cfg.eval, cfg.train.tokens_per_step):
        callbacks.append(InLoopEvalCallback())
    return train(cfg, resume=resume, quiet=quiet, callbacks=callbacks)


def eval_tasks_check(cfg: RunConfig) -> Check:
    """Preflight: every task of `eval.tasks` builds (data files found and readable)."""
    if not eval_interval(cfg.eval, cfg.train.tokens_per_step):
        return Check("eval tasks", "pass", "in-loop evaluation is off (eval.every=0)")
    extra = {"allow_unsafe_code": True} if cfg.eval.allow_unsafe_code else {}
    built, errors = [], []
    for spec in expand(cfg.eval.tasks):
        try:
            built.append(build_task(spec, cfg.eval.data_dir, cfg.eval.seed, **extra).name)
        except Exception as e:  # noqa: BLE001 - any reason a task cannot load is reported
            errors.append(f"{spec} ({type(e).__name__}: {e})")
    if errors:
        return Check("eval tasks", "fail", f"cannot load {len(errors)}: " + "; ".join(errors))
    return Check("eval tasks", "pass", f"{len(built)} load: {', '.join(built)}")


def preflight(cfg: RunConfig, full: bool = False) -> tuple[list[Check], DistInfo]:
    """`crucible preflight`: the training checks, plus (full) that the eval tasks load."""
    return run_preflight(cfg, full=full, extra=[eval_tasks_check])
