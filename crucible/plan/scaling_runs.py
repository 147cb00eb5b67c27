"""Scaling-law fits from finished run directories: read (N, D, loss, lr, batch), fit, report."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from crucible.plan.scaling import best_per_group, fit_chinchilla, fit_power_law


@dataclass(frozen=True)
class RunPoint:
    name: str
    params: float
    tokens: float
    val_loss: float
    lr: float
    batch_tokens: float


def read_run(run_dir: Path) -> RunPoint:
    summary = run_dir / "summary.json"
    if not summary.is_file():
        raise ValueError(f"{run_dir}: not a finished run (no summary.json)")
    s = json.loads(summary.read_text())
    missing = [k for k in ("params", "tokens", "val_loss") if s.get(k) is None]
    if missing:
        raise ValueError(f"{summary}: missing {', '.join(missing)}")
    cfg_path = run_dir / "config.yaml"
    cfg = yaml.safe_load(cfg_path.read_text()) if cfg_path.is_file() else {}
    train = cfg.get("train", {})
    batch = train.get("global_batch_size", 0) * train.get("seq_len", 0)
    lr = cfg.get("optim", {}).get("lr", float("nan"))
    name = s.get("name", run_dir.name)
    return RunPoint(name, s["params"], s["tokens"], s["val_loss"], lr, batch)


def fit_runs_report(run_dirs: list[Path], plot: str | None = None) -> str:
    seen: dict[Path, Path] = {}
    for d in run_dirs:
        key = Path(d).resolve()
        if key in seen:
            raise ValueError(f"scaling fit: {d} is the same run as {seen[key]}; list each run once")
        seen[key] = Path(d)
    pts = [read_run(d) for d in run_dirs]
    if len(pts) >= 5 and len({(p.params, p.tokens) for p in pts}) < 3:
        raise ValueError(
            "scaling fit: L(N, D) needs runs at several sizes and token counts; these runs span "
            f"{len({p.params for p in pts})} size(s) and {len({p.tokens for p in pts})} token "
            "count(s)"
        )
    out = [f"# Scaling fits over {len(pts)} runs", ""]
    n = [p.params for p in pts]
    d = [p.tokens for p in pts]
    y = [p.val_loss for p in pts]
    fit = None
    if len(pts) >= 5:
        fit = fit_chinchilla(n, d, y)
        law = fit.law
        out += [
            f"L(N, D) = {law.E:.3f} + {law.A:.4g} / N^{law.alpha:.3f} + {law.B:.4g} / D^"
            f"{law.beta:.3f}",
            f"error: RMS {fit.rms_log_error:.2%} (log loss), max |residual| "
            f"{fit.max_abs_error:.4f}",
            "",
        ]
    else:
        out += [f"L(N, D): needs >= 5 runs (have {len(pts)}); skipped", ""]
    for label, attr in (("learning rate", "lr"), ("batch (tokens)", "batch_tokens")):
        sizes, best = best_per_group(n, [getattr(p, attr) for p in pts], y)
        if len(sizes) >= 2:
            pl = fit_power_law(sizes, best)
            out.append(
                f"best {label} = {pl.coefficient:.4g} x N^{pl.exponent:.3f} "
                f"(RMS {pl.rms_log_error:.2%} in log, {pl.n_points} sizes)"
            )
        else:
            out.append(f"best {label}: needs runs at two or more model sizes; skipped")
    if plot:
        _plot(pts, fit, Path(plot))
        out.append(f"\nplot: {plot}")
    return "\n".join(out) + "\n"


def _plot(pts: list[RunPoint], fit, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    c = [6 * p.params * p.tokens for p in pts]
    ax.scatter(c, [p.val_loss for p in pts], label="runs")
    if fit is not None:
        pred = [fit.law.loss(p.params, p.tokens) for p in pts]
        ax.scatter(c, pred, marker="x", label="fit")
    ax.set_xscale("log")
    ax.set_xlabel("compute 6ND (FLOPs)")
    ax.set_ylabel("validation loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
