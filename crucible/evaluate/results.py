"""Evaluation results: one JSON file per checkpoint, tables, and comparisons of checkpoints.

A results file:
  {"model": PATH, "kind": ..., "checkpoint": "step_000300", "step": 300, "tokens": 1228800,
   "config": {"limit": ..., "seed": ..., "batch_size": ...},
   "tasks": {"arithmetic": {"metrics": {"acc": ..., ...}, "main_metric": "acc", "n": 200,
             "failures": 0, "random_baseline": 0.25, ...}, "gsm8k": {"error": "..."}}}
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_results(results: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1, default=str) + "\n")
    tmp.replace(path)
    return path


def read_results(path: str | Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def default_results_path(info: dict[str, Any]) -> Path:
    """runs/<run>/eval/<checkpoint>.json for our runs, <hf dir>/eval_results.json otherwise."""
    model = Path(info["model"])
    if info.get("checkpoint"):
        return model / "eval" / f"{info['checkpoint']}.json"
    return model / "eval_results.json"


def main_score(task_result: dict[str, Any]) -> float | None:
    metric = task_result.get("main_metric")
    return task_result.get("metrics", {}).get(metric) if metric else None


def format_table(results: dict[str, Any]) -> str:
    """One checkpoint: a row per task with its metrics, sample count, failures and baseline."""
    lines = [f"{'task':<22} {'main':>8} {'metric':<14} {'n':>5} {'fail':>4} {'random':>7}  other"]
    for name, r in results["tasks"].items():
        if "error" in r:
            lines.append(f"{name:<22} {'ERROR':>8} {r['error'][:70]}")
            continue
        main = main_score(r)
        others = "  ".join(
            f"{k} {v:.4f}" for k, v in r["metrics"].items() if k not in (r["main_metric"], "bytes")
        )
        lines.append(
            f"{name:<22} {_fmt(main):>8} {r['main_metric']:<14} {r['n']:>5} {r['failures']:>4} "
            f"{r['random_baseline']:>7.3f}  {others}"
        )
    return "\n".join(lines)


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def _label(r: dict[str, Any], i: int) -> str:
    ckpt = r.get("checkpoint")
    name = Path(str(r.get("model", f"model{i}"))).name
    return f"{name}/{ckpt}" if ckpt else name


def compare_table(results: list[dict[str, Any]]) -> str:
    """Main metric of every task (rows) for each checkpoint (columns), and the change vs the first."""
    labels = [_label(r, i) for i, r in enumerate(results)]
    tasks = list(dict.fromkeys(t for r in results for t in r["tasks"]))
    width = max(12, *(len(x) for x in labels))
    head = f"{'task':<22} {'metric':<14} " + " ".join(f"{x:>{width}}" for x in labels)
    lines = [head + (f" {'delta':>8}" if len(results) > 1 else "")]
    for t in tasks:
        rows = [r["tasks"].get(t, {}) for r in results]
        scores = [main_score(x) if "error" not in x else None for x in rows]
        metric = next((x["main_metric"] for x in rows if "main_metric" in x), "-")
        cells = " ".join(f"{_fmt(s):>{width}}" for s in scores)
        delta = ""
        if len(scores) > 1 and scores[0] is not None and scores[-1] is not None:
            delta = f" {scores[-1] - scores[0]:>+8.4f}"
        lines.append(f"{t:<22} {metric:<14} {cells}{delta}")
    return "\n".join(lines)
