"""Suite plots: loss curves with seed bands, final eval scores with CI error bars."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from crucible.ablate.results import SuiteResults  # noqa: E402
from crucible.ablate.runner import run_dir_of  # noqa: E402
from crucible.report.plots import save_figure  # noqa: E402
from crucible.train.metrics import read_metrics  # noqa: E402


def _curves(
    suite_dir: Path, arm: str, seeds: list[int], event: str, key: str
) -> tuple[np.ndarray, np.ndarray] | None:
    """(tokens, values[seed, point]) over the points every seed logged."""
    rows = [read_metrics(run_dir_of(suite_dir, arm, s), event) for s in seeds]
    per_seed = [{r["tokens"]: r[key] for r in rs if key in r} for rs in rows]
    if not per_seed:
        return None
    tokens = sorted(set.intersection(*(set(p) for p in per_seed)))
    if not tokens:
        return None
    return np.array(tokens), np.array([[p[t] for t in tokens] for p in per_seed])


def plot_loss_curves(suite_dir: Path, results: SuiteResults, out: Path) -> Path:
    """Train loss (mean over seeds, band = min..max) and validation loss per arm."""
    fig, (ax_t, ax_v) = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
    for i, arm in enumerate(results.arms):
        color = f"C{i}"
        for ax, event, key in ((ax_t, "train", "loss"), (ax_v, "val", "val_loss")):
            got = _curves(suite_dir, arm, results.seeds, event, key)
            if got is None:
                continue
            tokens, vals = got
            ax.plot(tokens, vals.mean(0), "-" if event == "train" else "o-", color=color, label=arm)
            if len(vals) > 1:
                ax.fill_between(tokens, vals.min(0), vals.max(0), color=color, alpha=0.2)
    for ax, title in ((ax_t, "training loss"), (ax_v, "validation loss")):
        ax.set_xlabel("tokens")
        ax.set_ylabel("loss (nats/token)")
        ax.set_title(f"{title} (band: min..max over {len(results.seeds)} seeds)")
        ax.grid(alpha=0.3)
        ax.legend()
    return save_figure(fig, out)


def eval_metrics_to_plot(results: SuiteResults) -> list[str]:
    evals = [m for m in results.metrics if "/" in m]
    return [m for m in evals if m.endswith("/acc_norm")] or evals


def plot_eval_scores(results: SuiteResults, out: Path) -> Path | None:
    """Final eval scores per task: one bar per arm, error bars = 95% CI of the mean."""
    metrics = eval_metrics_to_plot(results)
    if not metrics:
        return None
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(metrics) * len(results.arms) / 2), 4), dpi=110)
    width = 0.8 / len(results.arms)
    x = np.arange(len(metrics))
    for i, arm in enumerate(results.arms):
        stats = [results.summary(arm, m) for m in metrics]
        err = [0.0 if math.isnan(s.half_width) else s.half_width for s in stats]
        ax.bar(x + i * width, [s.mean for s in stats], width, yerr=err, capsize=3, label=arm)
    ax.set_xticks(x + width * (len(results.arms) - 1) / 2, metrics, rotation=20, ha="right")
    ax.set_ylabel("score")
    ax.set_title("final in-loop evaluation (error bars: 95% CI over seeds)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend()
    return save_figure(fig, out)
