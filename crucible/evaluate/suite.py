"""Task names -> Tasks, and running several tasks so that one failure never loses the others."""

from __future__ import annotations

import time
import traceback
from typing import Any

from crucible.evaluate.benchmarks import BENCHMARKS, build_benchmark, find_data, read_records
from crucible.evaluate.builtin import BUILTIN, build_builtin
from crucible.evaluate.lm import EvalLM
from crucible.evaluate.task import Task, run_task

# The offline early-signal suite: cheap, CF, meaningful for models of a few million parameters.
EARLY_SIGNAL = ["stdlib_next_line", "stdlib_next_sentence", "stdlib_docname", "arithmetic"]
GROUPS = {"early": EARLY_SIGNAL, "builtin": list(BUILTIN)}


def task_names() -> list[str]:
    return [*BUILTIN, *BENCHMARKS]


def expand(specs: list[str]) -> list[str]:
    out: list[str] = []
    for spec in specs:
        for s in spec.split(","):
            s = s.strip()
            if s:
                out.extend(GROUPS.get(s, [s]))
    return list(dict.fromkeys(out))


def build_task(spec: str, data_dir: str | None = None, seed: int = 0, **overrides: Any) -> Task:
    """`name` or `name=FILE` (benchmarks read FILE in their own record format)."""
    name, _, source = spec.partition("=")
    if name in BUILTIN:
        if source:
            raise ValueError(f"{name} is built in and takes no data file")
        task = build_builtin(name, seed=seed)
        overrides.pop("allow_unsafe_code", None)  # no built-in task runs code
        for k, v in overrides.items():
            setattr(task, k, v)
        return task
    if name in BENCHMARKS:
        records = read_records(source or find_data(name, data_dir))
        return build_benchmark(name, records, **overrides)
    raise ValueError(f"unknown task {name!r}; known: {', '.join(task_names())}, groups: early")


def evaluate_tasks(
    lm: EvalLM,
    specs: list[str],
    *,
    limit: int | None = None,
    seed: int = 0,
    data_dir: str | None = None,
    batch_size: int = 32,
    overrides: dict[str, Any] | None = None,
) -> dict[str, dict[str, Any]]:
    """{task: result}; a task that cannot be built or scored gets {"error": ...} instead."""
    results: dict[str, dict[str, Any]] = {}
    for spec in expand(specs):
        name = spec.partition("=")[0]
        t0 = time.perf_counter()
        try:
            task = build_task(spec, data_dir, seed, **(overrides or {}))
            res = run_task(task, lm, limit, seed, batch_size)
        except Exception as e:  # noqa: BLE001 - one broken task must not lose the others
            res = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc(limit=3)}
        res["seconds"] = round(time.perf_counter() - t0, 3)
        results[name] = res
    return results
