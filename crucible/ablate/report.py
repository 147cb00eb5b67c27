"""The suite report: what each variant changes, the final table with verdicts, plots, cost.

Writes suite_dir/report.md, report.html, loss_curves.png and eval_scores.png (when evaluated).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from crucible.ablate.plots import plot_eval_scores, plot_loss_curves
from crucible.ablate.results import SuiteResults, collect
from crucible.ablate.runner import duration
from crucible.ablate.stats import ALPHA
from crucible.ablate.suite import ArmPlan, Suite
from crucible.report.run_report import markdown_to_html


def _num(x: float, digits: int = 4) -> str:
    return "n/a" if math.isnan(x) else f"{x:.{digits}f}"


def _p(p: float) -> str:
    return "n/a" if math.isnan(p) else ("<0.001" if p < 1e-3 else f"{p:.3f}")


def _cell(v: object) -> str:
    # Table cells cannot hold a pipe; lists and other JSON values are shown compactly.
    return (v if isinstance(v, str) else json.dumps(v)).replace("|", "/")


def diff_table(arms: list[ArmPlan]) -> list[str]:
    base = arms[0]
    lines = [
        "| arm | changes vs baseline | params | Δ params | FLOPs/token | warnings |",
        "|---|---|---|---|---|---|",
    ]
    for a in arms:
        changes = "; ".join(f"`{k}`: {_cell(x)} → {_cell(y)}" for k, (x, y) in a.changes.items())
        lines.append(
            f"| {a.name} | {changes or '—'} | {a.params:,} | "
            f"{'—' if a is base else f'{a.param_delta:+.1%}'} | {a.flops_per_token:.4g} | "
            f"{' '.join(a.warnings).replace('|', '/') or '—'} |"
        )
    return lines


def final_table(results: SuiteResults, alpha: float = ALPHA) -> list[str]:
    ci = f"{1 - alpha:.0%}"
    lines = [
        f"| metric | arm | mean ± {ci} CI | std | Δ vs baseline ± {ci} CI | p (paired t) | "
        "verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in results.metrics:
        for arm in results.arms:
            s = results.summary(arm, m)
            row = f"| {m} | {arm} | {_num(s.mean)} ± {_num(s.half_width)} | {_num(s.std)} |"
            if arm == "baseline":
                lines.append(row + " — | — | — |")
                continue
            c = results.compare(arm, m, alpha)
            lines.append(
                row + f" {c.diff.mean:+.4f} ± {_num(c.diff.half_width)} | {_p(c.p)} | "
                f"**{c.verdict}** |"
            )
    return lines


def verdicts(results: SuiteResults, alpha: float = ALPHA) -> dict[str, dict[str, dict]]:
    """arm -> metric -> numbers, for results.json."""
    out: dict[str, dict[str, dict]] = {}
    for arm in results.arms:
        out[arm] = {}
        for m in results.metrics:
            s = results.summary(arm, m)
            entry = {"values": results.values[arm][m], "mean": s.mean, "std": s.std,
                     "ci": [s.ci_low, s.ci_high]}  # fmt: skip
            if arm != "baseline":
                c = results.compare(arm, m, alpha)
                entry |= {"diff_mean": c.diff.mean, "diff_ci": [c.diff.ci_low, c.diff.ci_high],
                          "t": c.t, "p": c.p, "verdict": c.verdict}  # fmt: skip
            out[arm][m] = entry
    return out


def _cost_lines(suite_dir: Path) -> list[str]:
    plan_path, timings_path = suite_dir / "plan.json", suite_dir / "timings.json"
    if not plan_path.is_file():
        return []
    est = json.loads(plan_path.read_text())["estimate"]
    timings = json.loads(timings_path.read_text()) if timings_path.is_file() else {}
    how = "measured warm-up" if est["measured"] else "default throughput"
    lines = [
        "## Cost",
        "",
        f"- runs: {est['runs']}, tokens: {est['tokens']:,}, training FLOPs: {est['flops']:.3g}",
        f"- estimated wall time: {duration(est['wall_s'])} "
        f"({how}, {est['flops_per_s']:.3g} FLOP/s)",
    ]
    if timings:
        lines.append(
            f"- actual wall time: {duration(sum(timings.values()))} over {len(timings)} "
            "runs trained by this suite"
        )
    return lines + [""]


def write_suite_report(
    suite: Suite, arms: list[ArmPlan], suite_dir: Path, alpha: float = ALPHA
) -> tuple[Path, Path]:
    suite_dir = Path(suite_dir)
    results = collect(suite, suite_dir)
    lines = [f"# Ablation suite `{suite.name}`", ""]
    if suite.description:
        lines += [suite.description, ""]
    base_over = " ".join(suite.baseline_overrides)
    lines += [
        f"- baseline: `{suite.config}`" + (f" with `{base_over}`" if base_over else ""),
        f"- seeds: {results.seeds} (paired: each seed is the same init and data order in every "
        "arm)",
        f"- tokens per run: {arms[0].tokens:,}",
        *(
            [
                f"- forked at step {suite.fork_step}: per seed, the baseline was trained once to "
                f"step {suite.fork_step} (`runs/trunk-s<seed>`); every arm, the baseline "
                "included, starts from that checkpoint (weights, optimizer, RNG) and differs "
                "only after it"
            ]
            if suite.fork_step is not None
            else []
        ),
        f"- verdicts: paired t-test on per-seed differences at α = {alpha}; lower is better for "
        "losses and bits-per-byte, higher for scores",
    ]
    if results.missing:
        lines.append(f"- unfinished runs (left out): {', '.join(results.missing)}")
    lines += ["", "## Variants", "", *diff_table(arms), ""]
    if results.seeds:
        lines += ["## Final metrics", "", *final_table(results, alpha), ""]
        lines += ["## Curves", "", "![loss curves](loss_curves.png)", ""]
        plot_loss_curves(suite_dir, results, suite_dir / "loss_curves.png")
        if plot_eval_scores(results, suite_dir / "eval_scores.png"):
            lines += ["![eval scores](eval_scores.png)", ""]
        numbers = {"seeds": results.seeds, "alpha": alpha, "arms": verdicts(results, alpha)}
        (suite_dir / "results.json").write_text(json.dumps(numbers, indent=1))
    else:
        lines += ["No seed has finished in every arm yet.", ""]
    lines += _cost_lines(suite_dir)
    lines += [
        "## Files",
        "",
        "`plan.json` (resolved arms and estimate), `results.json` (every number above), "
        "`runs/<arm>-s<seed>/` (ordinary run directories), `timings.json`.",
        "",
    ]
    md = "\n".join(lines)
    md_path, html_path = suite_dir / "report.md", suite_dir / "report.html"
    md_path.write_text(md)
    html_path.write_text(markdown_to_html(md, f"ablation {suite.name}"))
    return md_path, html_path
