"""Evaluation during training: a fixed subset of tasks every N steps, as flat scalar metrics.

Tasks and their subsets are built once, so every evaluation of a run scores the same documents
and the curve moves only because the model does. Every rank runs the same evaluation (FSDP needs
all ranks in each forward pass; with DDP the ranks agree by construction); rank 0 logs it.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch import nn

from crucible.config import EvalConfig, ModelConfig
from crucible.evaluate.lm import CrucibleLM, TextTokenizer
from crucible.evaluate.suite import build_task, expand
from crucible.evaluate.task import Task, run_task
from crucible.train.callbacks.base import Callback
from crucible.train.state import Run, StepResult


def eval_interval(cfg: EvalConfig, tokens_per_step: int) -> int:
    """Steps between evaluations (0: disabled); `every_tokens` is rounded up to whole steps."""
    if cfg.every:
        return cfg.every
    if cfg.every_tokens:
        return max(1, math.ceil(cfg.every_tokens / tokens_per_step))
    return 0


class InLoopEval:
    def __init__(
        self,
        cfg: EvalConfig,
        tokenizer: Any,  # a tokenizers.Tokenizer
        model_cfg: ModelConfig,
        tokens_per_step: int,
        total_steps: int,
        device: torch.device,
        autocast: torch.dtype | None = None,
    ) -> None:
        self.cfg, self.model_cfg = cfg, model_cfg
        self.interval = eval_interval(cfg, tokens_per_step)
        self.total_steps = total_steps
        self.device, self.autocast = device, autocast
        self.tokenizer = TextTokenizer.from_tokenizers(tokenizer)
        self.tasks: list[Task] = []
        self.errors: dict[str, str] = {}
        for spec in expand(cfg.tasks):
            try:
                extra = {"allow_unsafe_code": True} if cfg.allow_unsafe_code else {}
                self.tasks.append(build_task(spec, cfg.data_dir, cfg.seed, **extra))
            except Exception as e:  # noqa: BLE001 - a bad task is reported, training goes on
                self.errors[spec] = f"{type(e).__name__}: {e}"

    def due(self, step: int) -> bool:
        if not self.interval:
            return False
        return step % self.interval == 0 or (self.cfg.at_end and step == self.total_steps)

    def __call__(self, model: nn.Module) -> dict[str, float]:
        """Flat metrics {"<task>/<metric>": value, "eval_seconds": s} for the model as it is."""
        t0 = time.perf_counter()
        lm = CrucibleLM(model, self.tokenizer, self.model_cfg, self.device, self.autocast)
        out: dict[str, float] = {}
        for task in self.tasks:
            try:
                res = run_task(task, lm, self.cfg.subset, self.cfg.seed, self.cfg.batch_size)
            except Exception as e:  # noqa: BLE001
                self.errors[task.name] = f"{type(e).__name__}: {e}"
                continue
            for k, v in res["metrics"].items():
                if k not in ("stderr", "bytes"):
                    out[f"{task.name}/{k}"] = float(v)
            if res["failures"]:
                out[f"{task.name}/failures"] = float(res["failures"])
            # Logged beside the scores so the console, report and plots can show what chance is.
            out[f"{task.name}/random"] = float(task.random_baseline)
        out["eval_seconds"] = time.perf_counter() - t0
        return out


class InLoopEvalCallback(Callback):
    """Runs `InLoopEval` from the training loop (registered by the pretraining command)."""

    def on_train_start(self, run: Run) -> None:
        self.evaluator = InLoopEval(
            run.cfg.eval, run.tokenizer, run.cfg.model, run.tokens_per_step, run.cfg.train.steps,
            run.device, run.amp,
        )  # fmt: skip
        for name, err in self.evaluator.errors.items():
            run.say(f"[yellow]eval task {name} skipped:[/] {err}")

    def on_step_end(self, run: Run, result: StepResult) -> None:
        if not self.evaluator.due(result.step):
            return
        scores = self.evaluator(run.model)
        run.log("eval", result.step, tokens=result.step * run.tokens_per_step, **scores)
        shown = "  ".join(
            f"{k} {v:.3f} (random {scores.get(k.split('/')[0] + '/random', float('nan')):.2f})"
            for k, v in scores.items()
            if k.endswith("/acc_norm")
        )
        run.say(f"  [magenta]eval[/] step {result.step}: {shown} ({scores['eval_seconds']:.1f}s)")
