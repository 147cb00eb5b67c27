"""Tokenizer comparison output: a console table, JSON rows and a bar chart."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from rich.table import Table

from crucible.tokenizer.metrics import TokenizerMetrics

# (attribute, column title, lower is better?)
METRICS: tuple[tuple[str, str, bool], ...] = (
    ("fertility", "fertility", True),
    ("pcw", "continued words", True),
    ("bytes_per_token", "bytes/token", False),
    ("chars_per_token", "chars/token", False),
)


def metrics_table(rows: Sequence[TokenizerMetrics]) -> Table:
    splitters = ", ".join(dict.fromkeys(r.splitter for r in rows)) or "-"
    table = Table(
        title="tokenizer metrics (fertility, PCW: lower is better)",
        caption=f"words split by: {splitters}",
    )
    for col in ("tokenizer", "corpus", "lang", "splitter", "words"):
        table.add_column(col, justify="right" if col == "words" else "left")
    for _, title, _ in METRICS:
        table.add_column(title, justify="right")
    for r in rows:
        values = [f"{getattr(r, attr):.3f}" for attr, _, _ in METRICS]
        table.add_row(r.tokenizer, r.corpus, r.language or "-", r.splitter, f"{r.words:,}", *values)
    return table


def write_json(rows: Sequence[TokenizerMetrics], path: str | os.PathLike[str]) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps([r.as_dict() for r in rows], indent=2) + "\n")
    tmp.replace(out)
    return out


def bar_chart(rows: Sequence[TokenizerMetrics], path: str | os.PathLike[str]) -> Path:
    """One panel per metric; corpora on the x axis, one bar per tokenizer."""
    import matplotlib

    matplotlib.use("Agg")  # files only: works without a display
    import matplotlib.pyplot as plt

    tokenizers = list(dict.fromkeys(r.tokenizer for r in rows))
    corpora = list(dict.fromkeys(r.corpus for r in rows))
    by_key = {(r.tokenizer, r.corpus): r for r in rows}
    fig, axes = plt.subplots(2, 2, figsize=(max(8, 1.2 * len(corpora) * len(tokenizers)), 7))
    width = 0.8 / max(1, len(tokenizers))
    for ax, (attr, title, lower) in zip(axes.flat, METRICS):
        for t, name in enumerate(tokenizers):
            xs = [c + (t - (len(tokenizers) - 1) / 2) * width for c in range(len(corpora))]
            ys = [getattr(by_key[name, c], attr) if (name, c) in by_key else 0 for c in corpora]
            ax.bar(xs, ys, width, label=name)
        ax.set_xticks(range(len(corpora)), corpora, rotation=30, ha="right")
        ax.set_title(f"{title} ({'lower' if lower else 'higher'} is better)")
    axes.flat[0].legend(fontsize="small")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp{out.suffix}")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(out)
    return out
