"""A short Markdown + HTML report of one run: config, metrics, samples, where things are."""

from __future__ import annotations

import html
import json
from pathlib import Path

from crucible.atomic import write_text_atomic
from crucible.train.metrics import read_metrics


def write_run_report(
    run_dir: Path, samples: list[tuple[str, str]] | None = None, extra: dict | None = None
) -> tuple[Path, Path]:
    run_dir = Path(run_dir)
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    val = read_metrics(run_dir, "val")
    train = read_metrics(run_dir, "train")
    lines = [f"# Run `{run_dir.name}`", ""]
    if summary:
        lines += [
            f"- parameters: {summary.get('params', 0):,}",
            f"- steps: {summary.get('step')}, tokens: {summary.get('tokens', 0):,}",
            f"- final validation loss: {summary.get('val_loss', float('nan')):.4f} nats/token, "
            f"bits-per-byte: {summary.get('val_bpb', float('nan')):.4f}",
        ]
    if train:
        first, last = train[0], train[-1]
        speed = sum(r["tokens_per_s"] for r in train) / len(train)
        lines.append(
            f"- training loss {first['loss']:.3f} (step {first['step']}) -> "
            f"{last['loss']:.3f} (step {last['step']}), mean {speed:,.0f} tokens/s"
        )
    for k, v in (extra or {}).items():
        lines.append(f"- {k}: {v}")
    lines += ["", "![loss curve](loss.png)", ""]
    if val:
        lines += ["## Validation", "", "| step | tokens | loss | bits/byte |", "|---|---|---|---|"]
        lines += [
            f"| {r['step']} | {r['tokens']:,} | {r['val_loss']:.4f} | {r['val_bpb']:.4f} |"
            for r in val
        ]
        lines.append("")
    evals = read_metrics(run_dir, "eval")
    if evals:
        # One column per task: its length-normalised accuracy (or the task's first metric).
        keys = sorted({k for r in evals for k in r if "/" in k and k.endswith("/acc_norm")})
        keys = keys or sorted({k for r in evals for k in r if "/" in k})[:6]
        lines += ["## In-loop evaluation", "", "| step | " + " | ".join(keys) + " |"]
        lines.append("|---" * (len(keys) + 1) + "|")
        # What a uniform random guesser scores: a task is learning only once it is clearly above.
        chance = [evals[-1].get(k.split("/")[0] + "/random") for k in keys]
        if any(isinstance(c, float) for c in chance):
            lines.append(
                "| random | "
                + " | ".join(f"{c:.3f}" if isinstance(c, float) else "" for c in chance)
                + " |"
            )
        for r in evals:
            cells = [f"{r[k]:.3f}" if isinstance(r.get(k), float) else "" for k in keys]
            lines.append(f"| {r['step']} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += incident_lines(run_dir)
    if samples:
        lines += ["## Samples", ""]
        for prompt, text in samples:
            lines += [f"**Prompt:** `{prompt}`", "", "```", prompt + text, "```", ""]
    lines += [
        "## Files",
        "",
        "`config.yaml` (resolved config), `metrics.jsonl`, `checkpoints/`, `tokenizer.json`, "
        "`loss.png`, `hf/` (Hugging Face export, when exported).",
        "",
    ]
    md = "\n".join(lines)
    md_path = run_dir / "report.md"
    write_text_atomic(md_path, md)
    html_path = run_dir / "report.html"
    write_text_atomic(html_path, markdown_to_html(md, run_dir.name))
    return md_path, html_path


def incident_lines(run_dir: Path) -> list[str]:
    """Markdown tables of the run's incidents (skipped steps, rollbacks) and alerts."""
    lines: list[str] = []
    incidents = read_metrics(run_dir, "incident")
    faults = {r["step"]: r["kind"] for r in read_metrics(run_dir, "fault")}
    if incidents or faults:
        lines += [
            "## Incidents",
            "",
            f"{len(incidents)} incident(s); injected faults: "
            + (", ".join(f"{k} at step {s}" for s, k in sorted(faults.items())) or "none"),
            "",
            "| step | kind | action | signal | value | threshold | detail |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in incidents:
            value, limit = r.get("value", r.get("loss")), r.get("threshold")
            detail = (
                f"from step {r['from_step']}, skip {r['skip_batches']} batches"
                if r["kind"] == "rollback"
                else f"streak {r.get('streak', '')}"
            )
            lines.append(
                f"| {r['step']} | {r['kind']} | {r['action']} | {r.get('signal', '')} | "
                f"{_num(value)} | {_num(limit)} | {detail} |"
            )
        lines.append("")
    alerts = read_metrics(run_dir, "alert")
    if alerts:
        lines += ["## Alerts", "", "| step | kind | what | probable cause |", "|---|---|---|---|"]
        lines += [f"| {r['step']} | {r['kind']} | {r['message']} | {r['cause']} |" for r in alerts]
        lines.append("")
    return lines


def _num(x) -> str:
    return f"{x:.4g}" if isinstance(x, int | float) else ""


def markdown_to_html(md: str, title: str) -> str:
    """Enough Markdown for our own reports: headings, bullets, tables, code, images."""
    out, in_code, in_table, in_list = [], False, False, False
    for line in md.splitlines():
        if line.startswith("```"):
            out.append("</pre>" if in_code else "<pre>")
            in_code = not in_code
            continue
        if in_code:
            out.append(html.escape(line))
            continue
        if in_list and not line.startswith("- "):
            out.append("</ul>")
            in_list = False
        if in_table and not line.startswith("|"):
            out.append("</table>")
            in_table = False
        if line.startswith("# "):
            out.append(f"<h1>{html.escape(line[2:])}</h1>")
        elif line.startswith("## "):
            out.append(f"<h2>{html.escape(line[3:])}</h2>")
        elif line.startswith("- "):
            if not in_list:
                out.append("<ul>")
                in_list = True
            out.append(f"<li>{_inline(line[2:])}</li>")
        elif line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if set("".join(cells)) <= {"-"}:
                continue
            tag = "th" if not in_table else "td"
            if not in_table:
                out.append("<table>")
                in_table = True
            out.append("<tr>" + "".join(f"<{tag}>{_inline(c)}</{tag}>" for c in cells) + "</tr>")
        elif line.startswith("!["):
            alt, src = line[2:].split("](", 1)
            out.append(f'<img alt="{html.escape(alt)}" src="{html.escape(src.rstrip(")"))}">')
        elif line.strip():
            out.append(f"<p>{_inline(line)}</p>")
    if in_list:
        out.append("</ul>")
    if in_table:
        out.append("</table>")
    style = (
        "body{font-family:sans-serif;max-width:900px;margin:2em auto}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px}"
        "pre{background:#f4f4f4;padding:8px;white-space:pre-wrap}img{max-width:100%}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{style}</style></head><body>\n" + "\n".join(out) + "\n</body></html>\n"
    )


def _inline(text: str) -> str:
    parts = html.escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts)).replace(
        "**", ""
    )
