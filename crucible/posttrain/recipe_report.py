"""The recipe's report: every evaluated model's metrics side by side (stages.json, report.md,
stages.png in the recipe's output directory), read from the eval results the stages wrote."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from crucible.atomic import write_text_atomic

if TYPE_CHECKING:
    from crucible.posttrain.recipe import Plan

# eval-chat metrics shown, in order, with their labels.
CHAT_METRICS = {
    "ends_with_eot": "replies ending with `<|im_end|>`",
    "mode_following": "mode following (all)",
    "mode_following_think": "  think: closed, non-empty `<think>`",
    "mode_following_no_think": "  no-think: no `<think>` block",
    "arithmetic_accuracy": "arithmetic accuracy",
    "tool_call_correct": "calculator call, correct expression",
    "tool_answer_accuracy": "tool task answered after the result",
    "name_the_function_accuracy": "name-the-function accuracy",
}
PLOTTED = ["ends_with_eot", "mode_following", "arithmetic_accuracy", "tool_call_correct"]


def _read(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def collect(plan: Plan, markers: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per evaluated model: its stage, eval-chat shares, task scores and times."""
    from crucible.evaluate.results import main_score

    kinds = {s.name: s.kind for s in plan.stages}
    rows = []
    for name in plan.eval_models():
        row: dict[str, Any] = {"stage": name, "kind": kinds.get(name, "base"),
                               "run_dir": str(plan.dirs[name]),
                               "stage_seconds": markers.get(name, {}).get("seconds")}  # fmt: skip
        chat = _read(plan.out / "eval" / f"{name}.chat.json")
        if chat is not None:
            m = chat["metrics"]
            row["chat"] = {k: m[k] for k in CHAT_METRICS if k in m}
            row["chat_seconds"] = m.get("seconds")
        tasks = _read(plan.out / "eval" / f"{name}.tasks.json")
        if tasks is not None:
            row["tasks"] = {t: {"main_metric": r.get("main_metric"), "score": main_score(r),
                                "metrics": r.get("metrics", {})}
                            for t, r in tasks["tasks"].items()}  # fmt: skip
        rows.append(row)
    return rows


def _share(v: dict[str, Any] | None) -> str:
    if not v or v.get("share") is None:
        return "n/a"
    return f"{v['share']:.1%} ({round(v['share'] * v['n'])}/{v['n']})"


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown: a row per measure, a column per stage."""
    head = "| measure | " + " | ".join(f"{r['stage']} ({r['kind']})" for r in rows) + " |"
    lines = [head, "|---" * (len(rows) + 1) + "|"]
    for key, label in CHAT_METRICS.items():
        if any(key in r.get("chat", {}) for r in rows):
            cells = [_share(r.get("chat", {}).get(key)) for r in rows]
            label = label.replace("|", "\\|")  # a pipe would end the table cell
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    tasks = list(dict.fromkeys(t for r in rows for t in r.get("tasks", {})))
    for t in tasks:
        metric = next(r["tasks"][t]["main_metric"] for r in rows if t in r.get("tasks", {}))
        cells = []
        for r in rows:
            s = r.get("tasks", {}).get(t, {}).get("score")
            cells.append("n/a" if s is None else f"{s:.4f}")
        lines.append(f"| {t} ({metric}) | " + " | ".join(cells) + " |")
    for key, label in (("stage_seconds", "stage time (s)"), ("chat_seconds", "eval-chat time (s)")):
        cells = ["" if r.get(key) is None else f"{r[key]:.1f}" for r in rows]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], out: Path) -> Path:
    """Grouped bars of the main eval-chat shares per stage, and each task's score per stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from crucible.report.plots import save_figure

    tasks = list(dict.fromkeys(t for r in rows for t in r.get("tasks", {})))
    fig, axes = plt.subplots(1, 1 + len(tasks), figsize=(7 + 3.5 * len(tasks), 4.2), dpi=110,
                             squeeze=False)  # fmt: skip
    ax = axes[0][0]
    x = np.arange(len(rows))
    width = 0.8 / len(PLOTTED)
    for i, key in enumerate(PLOTTED):
        vals = [(r.get("chat", {}).get(key) or {}).get("share") or 0.0 for r in rows]
        ax.bar(x + (i - (len(PLOTTED) - 1) / 2) * width, vals, width, label=key)
    ax.set_xticks(x, [r["stage"] for r in rows], rotation=30, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("share of held-out conversations")
    ax.set_title("eval-chat")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7)
    for ax, t in zip(axes[0][1:], tasks):
        scores = [r.get("tasks", {}).get(t, {}).get("score") for r in rows]
        ax.plot(x, [np.nan if s is None else s for s in scores], "o-")
        metric = next(r["tasks"][t]["main_metric"] for r in rows if t in r.get("tasks", {}))
        ax.set_xticks(x, [r["stage"] for r in rows], rotation=30, ha="right")
        ax.set_ylabel(metric)
        ax.set_title(t)
        ax.grid(alpha=0.3)
    return save_figure(fig, out)


def write_report(plan: Plan, markers: dict[str, dict[str, Any]]) -> list[Path]:
    """stages.json, report.md and stages.png in the recipe's output directory (atomically)."""
    rows = collect(plan, markers)
    out = plan.out
    data = {"recipe": plan.recipe.name, "base": str(plan.dirs["base"]),
            "stages": [{"name": s.name, "kind": s.kind, **{k: markers[s.name].get(k)
                        for k in ("argv", "seconds", "finished")}} for s in plan.stages],
            "evaluated": rows}  # fmt: skip
    write_text_atomic(out / "stages.json", json.dumps(data, indent=1) + "\n")
    ev = plan.recipe.eval
    from crucible.posttrain.recipe_config import substitute

    lines = [f"# Recipe {plan.recipe.name}", ""]
    lines += ["Stages (each a crucible command; times are wall clock):", ""]
    for s in data["stages"]:
        lines.append(f"- `{s['name']}` ({s['kind']}, {s['seconds']} s): "
                     f"`crucible {' '.join(s['argv'] or [])}`")  # fmt: skip
    if ev is not None:
        lines += ["", f"Every model on the same held-out data: `eval-chat` on "
                  f"{substitute(ev.chat_data, plan.dirs)}"
                  f"{f' (first {ev.limit})' if ev.limit else ''}, greedy, at most "
                  f"{ev.max_new_tokens} new tokens"
                  + (f"; `crucible eval --tasks {ev.tasks}`" if ev.tasks else "")
                  + (f" ({ev.task_limit} documents per task)" if ev.task_limit else "") + ".",
                  ""]  # fmt: skip
        lines += [table(rows), "", "![metrics per stage](stages.png)", ""]
        files = [out / "stages.json", out / "report.md", plot(rows, out / "stages.png")]
    else:
        files = [out / "stages.json", out / "report.md"]
    write_text_atomic(out / "report.md", "\n".join(lines))
    return files
