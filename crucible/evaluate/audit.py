"""Which tasks are worth watching in ablations? Statistics over runs with several seeds.

Inputs: run directories whose `metrics.jsonl` holds in-loop `eval` events and/or whose `eval/`
folder holds results files. Runs of one recipe with different seeds give the noise. Per task
(scores oriented so that higher is better; bits-per-byte is negated):

  monotonicity   Spearman rho between tokens and the seed-mean score
  seed_noise     mean over token counts (seen by >= 2 seeds) of the std across seeds (ddof 1)
  snr            (last - first seed-mean score) / seed_noise
  above_random   last seed-mean score - random baseline (also in units of seed_noise)
  consistency    Kendall tau-b between two seeds' scores over shared checkpoints, averaged over
                 seed pairs: do seeds agree which checkpoint is better?

A task is kept when rho >= 0.6, snr >= 2, and its final score is above random by more than two
seed standard deviations (and consistency >= 0.3 where it can be computed).
"""

from __future__ import annotations

import itertools
import json
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from statistics import fmean, stdev
from typing import Any

KEEP = {"monotonicity": 0.6, "snr": 2.0, "above_random_sd": 2.0, "consistency": 0.3}


# --------------------------------------------------------------------------- rank statistics


def _ranks(xs: list[float]) -> list[float]:
    """1-based ranks, ties sharing their average rank."""
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    ranks = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def pearson(x: list[float], y: list[float]) -> float:
    mx, my = fmean(x), fmean(y)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy) if sxx and syy else float("nan")


def spearman(x: list[float], y: list[float]) -> float:
    return pearson(_ranks(x), _ranks(y))


def kendall_tau(x: list[float], y: list[float]) -> float:
    """Kendall tau-b (ties in either variable adjust the denominator)."""
    concordant = discordant = ties_x = ties_y = 0
    for i, j in itertools.combinations(range(len(x)), 2):
        dx, dy = x[i] - x[j], y[i] - y[j]
        if dx == 0 and dy == 0:
            continue
        if dx == 0:
            ties_x += 1
        elif dy == 0:
            ties_y += 1
        elif dx * dy > 0:
            concordant += 1
        else:
            discordant += 1
    denom = math.sqrt((concordant + discordant + ties_x) * (concordant + discordant + ties_y))
    return (concordant - discordant) / denom if denom else float("nan")


# --------------------------------------------------------------------------- collecting scores


@dataclass
class TaskCurves:
    """scores[seed][tokens] of one task, with its metric and baseline."""

    metric: str
    random_baseline: float
    higher_is_better: bool
    scores: dict[str, dict[int, float]]


def _task_info(task: str) -> tuple[str, float, bool]:
    from crucible.evaluate.builtin import BUILTIN, builtin_info

    return builtin_info(task) if task in BUILTIN else ("acc_norm", 0.25, True)


def collect(run_dirs: list[Path]) -> dict[str, TaskCurves]:
    """Scores per task, seed and token count, from in-loop events and results files."""
    import yaml

    curves: dict[str, TaskCurves] = {}
    for run in map(Path, run_dirs):
        cfg_path = run / "config.yaml"
        seed_val = yaml.safe_load(cfg_path.read_text()).get("seed") if cfg_path.is_file() else None
        seed = f"{run.name}(seed {seed_val})"
        for tokens, task, score, info in _points(run):
            c = curves.setdefault(task, TaskCurves(*info, scores=defaultdict(dict)))
            c.scores[seed][tokens] = score
    return curves


def _points(run: Path):
    metrics = run / "metrics.jsonl"
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            if not line.strip():
                continue
            e = json.loads(line)
            if e.get("event") != "eval" or e.get("tokens") is None:
                continue
            for key, value in e.items():
                if "/" not in key:
                    continue
                task, metric = key.split("/", 1)
                info = _task_info(task)
                if metric == info[0]:
                    yield int(e["tokens"]), task, float(value), info
    for path in sorted((run / "eval").glob("*.json")) if (run / "eval").is_dir() else []:
        r = json.loads(path.read_text())
        if r.get("tokens") is None:
            continue
        for task, t in r.get("tasks", {}).items():
            metric = t.get("main_metric")
            if "error" in t or metric not in t.get("metrics", {}):
                continue
            info = (metric, t["random_baseline"], t.get("higher_is_better", True))
            yield int(r["tokens"]), task, float(t["metrics"][metric]), info


# --------------------------------------------------------------------------- statistics


def task_stats(c: TaskCurves) -> dict[str, Any]:
    sign = 1.0 if c.higher_is_better else -1.0
    seeds = sorted(c.scores)
    tokens = sorted({t for s in seeds for t in c.scores[s]})
    mean = {t: fmean(c.scores[s][t] for s in seeds if t in c.scores[s]) for t in tokens}
    spreads = [
        stdev(vals)
        for t in tokens
        if len(vals := [c.scores[s][t] for s in seeds if t in c.scores[s]]) >= 2
    ]
    noise = fmean(spreads) if spreads else float("nan")
    ys = [sign * mean[t] for t in tokens]
    rho = spearman([float(t) for t in tokens], ys) if len(tokens) >= 3 else float("nan")
    signal = ys[-1] - ys[0] if len(ys) >= 2 else float("nan")
    above = sign * (mean[tokens[-1]] - c.random_baseline) if tokens else float("nan")
    taus = []
    for a, b in itertools.combinations(seeds, 2):
        common = sorted(set(c.scores[a]) & set(c.scores[b]))
        if len(common) >= 3:
            tau = kendall_tau([c.scores[a][t] for t in common], [c.scores[b][t] for t in common])
            if not math.isnan(tau):
                taus.append(tau)
    stats = {
        "metric": c.metric,
        "seeds": len(seeds),
        "checkpoints": len(tokens),
        "final": mean[tokens[-1]] if tokens else float("nan"),
        "random_baseline": c.random_baseline,
        "monotonicity": rho,
        "seed_noise": noise,
        "snr": signal / noise if noise and not math.isnan(noise) else float("nan"),
        "above_random": above,
        "above_random_sd": above / noise if noise and not math.isnan(noise) else float("nan"),
        "consistency": fmean(taus) if taus else float("nan"),
    }
    stats["keep"], stats["why"] = _recommend(stats)
    return stats


def _recommend(s: dict[str, Any]) -> tuple[bool, str]:
    problems = []
    for key, low in KEEP.items():
        v = s[key]
        if math.isnan(v):
            if key != "consistency":
                problems.append(f"{key} unknown")
        elif v < low:
            problems.append(f"{key} {v:.2f} < {low}")
    return not problems, "; ".join(problems) or "monotone, above noise and random"


def audit(run_dirs: list[Path]) -> dict[str, dict[str, Any]]:
    curves = collect(run_dirs)
    if not curves:
        raise ValueError(
            "no evaluation scores found: enable in-loop eval (eval.every=N) or run `crucible eval`"
        )
    return {task: task_stats(c) for task, c in sorted(curves.items())}


def format_audit(stats: dict[str, dict[str, Any]]) -> str:
    cols = ["monotonicity", "seed_noise", "snr", "above_random", "consistency"]
    head = f"{'task':<22} {'metric':<12} {'final':>7} " + " ".join(f"{c[:12]:>12}" for c in cols)
    lines = [head + "  keep  why"]
    for task, s in stats.items():
        cells = " ".join(f"{s[c]:>12.3f}" for c in cols)
        lines.append(
            f"{task:<22} {s['metric']:<12} {s['final']:>7.3f} {cells}  "
            f"{'yes' if s['keep'] else 'no':<4}  {s['why']}"
        )
    return "\n".join(lines)


def plot_audit(run_dirs: list[Path], out: Path) -> Path:
    """Score vs tokens per task: each seed, the seed mean, the min-max band and random."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = collect(run_dirs)
    n = len(curves)
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
    for ax, (task, c) in zip(axes.flat, sorted(curves.items())):
        tokens = sorted({t for s in c.scores.values() for t in s})
        for _, pts in sorted(c.scores.items()):
            ts = sorted(pts)
            ax.plot(ts, [pts[t] for t in ts], lw=0.8, alpha=0.5)
        vals = [[s[t] for s in c.scores.values() if t in s] for t in tokens]
        ax.fill_between(tokens, [min(v) for v in vals], [max(v) for v in vals], alpha=0.2)
        ax.plot(tokens, [fmean(v) for v in vals], color="black", lw=1.6, label="seed mean")
        ax.axhline(c.random_baseline, ls="--", color="grey", lw=1, label="random")
        ax.set_title(task, fontsize=10)
        ax.set_xlabel("tokens")
        ax.set_ylabel(c.metric)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
