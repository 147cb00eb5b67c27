"""Loss curves from metrics.jsonl."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402

from crucible.train.metrics import read_metrics  # noqa: E402


def plot_loss_curve(run_dir: Path, out: Path | None = None) -> Path:
    """Training loss (and validation loss when logged) against tokens seen."""
    run_dir = Path(run_dir)
    out = out or run_dir / "loss.png"
    train = read_metrics(run_dir, "train")
    val = read_metrics(run_dir, "val")
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot([r["tokens"] for r in train], [r["loss"] for r in train], label="train loss")
    if val:
        ax.plot(
            [r["tokens"] for r in val], [r["val_loss"] for r in val], "o-", label="validation loss"
        )
    tokens_per_step = train[0]["tokens"] / train[0]["step"] if train else 0
    marks = {"skip": ("x", "tab:orange"), "rollback": ("v", "tab:red")}
    for action, (marker, color) in marks.items():
        rows = [r for r in read_metrics(run_dir, "incident") if r["action"] == action]
        if rows:  # incidents at the step they hit; a rollback at the step it left
            xs = [r.get("from_step", r["step"]) * tokens_per_step for r in rows]
            # a loss spike at the loss it reached; anything else on the curve
            ys = [r["value"] if r.get("signal") == "loss" else _near(train, x)
                  for r, x in zip(rows, xs)]  # fmt: skip
            ax.scatter(xs, ys, marker=marker, color=color, zorder=3, label=f"incident: {action}")
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(run_dir.name)
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, out)


def _near(train: list[dict], tokens: float) -> float:
    """The logged training loss nearest to `tokens` (where to draw a mark)."""
    if not train:
        return 0.0
    return min(train, key=lambda r: abs(r["tokens"] - tokens))["loss"]


def save_figure(fig: plt.Figure, out: Path) -> Path:
    """Write a figure atomically (temporary file, then rename) and close it."""
    fig.tight_layout()
    tmp = out.with_name(out.stem + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(out)
    return out
