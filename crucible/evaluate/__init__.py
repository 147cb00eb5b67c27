"""Evaluation: log-likelihood and generative tasks, in-loop evaluation, results and task audits.

See docs/evaluation.md. The CLI lives in `crucible.evaluate.commands` (`register`).
"""

from crucible.evaluate.lm import HFLM, CrucibleLM, EvalLM, TextTokenizer
from crucible.evaluate.load import load_eval_model
from crucible.evaluate.scoring import Request, Score, bits_per_byte, loglikelihood
from crucible.evaluate.suite import EARLY_SIGNAL, build_task, evaluate_tasks, task_names
from crucible.evaluate.task import GenDoc, MCDoc, Task, TaskDataError, run_task

__all__ = [
    "EARLY_SIGNAL",
    "HFLM",
    "CrucibleLM",
    "EvalLM",
    "GenDoc",
    "MCDoc",
    "Request",
    "Score",
    "Task",
    "TaskDataError",
    "TextTokenizer",
    "bits_per_byte",
    "build_task",
    "evaluate_tasks",
    "load_eval_model",
    "loglikelihood",
    "run_task",
    "task_names",
]
