"""Eval-driven merge search: grid one parameter of the last merge, score each on an eval task.

    crucible merge CONFIG --search weight=0:1:0.1 --task arithmetic [--limit 200]

Parameters: `weight` (one model: its weight; two models: x for the first, 1 - x for the second,
e.g. 0.9 soup + 0.1 mid-training), `t` (slerp), `lambda` and `density` (every model). The inputs
are read once; each point is merged in memory and scored with `crucible.evaluate` on the task's
main metric. Writes search.md (table), search.json and search.png beside the output.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from crucible.config import ConfigError
from crucible.posttrain.merge_config import MergeSpec, ModelEntry
from crucible.posttrain.merge_io import Source
from crucible.posttrain.merge_run import run_merges

SEARCH_PARAMS = ("weight", "t", "lambda", "density")


def parse_grid(text: str) -> tuple[str, list[float]]:
    """`weight=0:1:0.1` (start:stop:step, stop included) or `weight=0.2,0.5,0.8`."""
    name, sep, values = text.partition("=")
    name = name.strip()
    if not sep or name not in SEARCH_PARAMS:
        raise ConfigError(
            f"--search {text!r}: expected NAME=START:STOP:STEP or NAME=A,B,C with NAME one of "
            f"{', '.join(SEARCH_PARAMS)}"
        )
    try:
        if ":" in values:
            start, stop, step = (float(v) for v in values.split(":"))
            if step <= 0 or stop < start:
                raise ValueError
            n = int(math.floor((stop - start) / step + 1e-9)) + 1
            grid = [round(start + i * step, 10) for i in range(n)]
        else:
            grid = [float(v) for v in values.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(
            f"--search {text!r}: values must be START:STOP:STEP (step > 0, stop >= start) or a "
            "comma-separated list of numbers"
        ) from None
    if not grid:
        raise ConfigError(f"--search {text!r}: no values")
    return name, grid


def _with_params(entry: ModelEntry, **kw: float) -> ModelEntry:
    params = entry.parameters.model_copy(update=kw)
    return entry.model_copy(update={"parameters": params})


def apply_value(spec: MergeSpec, name: str, x: float) -> MergeSpec:
    """The spec with parameter `name` set to x (see the module docstring)."""
    m = spec.merge_method
    others = spec.others()
    if name == "weight":
        if m in ("slerp", "model_soup"):
            raise ConfigError(f"--search weight: {m} has no model weights (slerp: search t)")
        if len(others) == 1:
            new = {others[0].model: x}
        elif len(others) == 2:
            new = {others[0].model: x, others[1].model: 1 - x}
        else:
            raise ConfigError(
                f"--search weight needs a merge of one or two models (besides the base), "
                f"got {len(others)}"
            )
        models = [_with_params(e, weight=new[e.model]) if e.model in new else e
                  for e in spec.models]  # fmt: skip
        return spec.model_copy(update={"models": models})
    if name == "t":
        if m != "slerp":
            raise ConfigError(f"--search t: only slerp has t, the merge method is {m}")
        return spec.model_copy(update={"parameters": spec.parameters.model_copy(update={"t": x})})
    if name == "lambda":
        params = spec.parameters.model_copy(update={"lambda_": x})
        return spec.model_copy(update={"parameters": params})
    if m not in ("ties", "dare_linear", "dare_ties"):
        raise ConfigError(f"--search density: only ties and dare_* have a density, not {m}")
    models = [_with_params(e, density=x) if e in others else e for e in spec.models]
    return spec.model_copy(update={"models": models})


def _score(state, template: Source, task: str, limit: int | None, device: str, seed: int):
    import torch

    from crucible.evaluate.lm import CrucibleLM, TextTokenizer
    from crucible.evaluate.suite import evaluate_tasks
    from crucible.model import Transformer
    from crucible.tokenizer.train import load_tokenizer

    if template.tokenizer is None:
        raise ConfigError("--search needs a tokenizer.json beside the models to evaluate them")
    with torch.device("meta"):
        model = Transformer(template.model_cfg)
    model.load_state_dict({k: v.float() for k, v in state.items()}, assign=True)
    model.init_buffers()
    model = model.to(device).eval()
    tok = TextTokenizer.from_tokenizers(load_tokenizer(template.tokenizer))
    lm = CrucibleLM(model, tok, template.model_cfg, device, name="merge")
    res = evaluate_tasks(lm, [task], limit=limit, seed=seed)[task.partition("=")[0]]
    if "error" in res:
        raise ConfigError(f"--task {task}: {res['error']}")
    return res["metrics"][res["main_metric"]], res["main_metric"], res


def search(
    specs: list[MergeSpec],
    param: str,
    grid: list[float],
    task: str,
    out_dir: Path,
    *,
    limit: int | None = None,
    device: str = "cpu",
    seed: int = 0,
    config_dir: Path | None = None,
) -> dict[str, Any]:
    """Score every grid point; write search.md / .json / .png into out_dir; return the table."""
    head, last = specs[:-1], specs[-1]
    variants = [[*head, apply_value(last, param, x)] for x in grid]  # validate all first
    loaded: dict[str, Source] = {}
    rows: list[dict[str, Any]] = []
    metric = ""
    for x, variant in zip(grid, variants):
        t0 = time.perf_counter()
        state, template, _ = run_merges(variant, config_dir, loaded=loaded)
        score, metric, res = _score(state, template, task, limit, device, seed)
        rows.append({param: x, metric: score, "n": res["n"],
                     "seconds": round(time.perf_counter() - t0, 2)})  # fmt: skip
        print(f"{param}={x:g}: {metric} {score:.4f} (n={res['n']})")
    best = max(rows, key=lambda r: r[metric])
    table = {"param": param, "task": task, "metric": metric, "limit": limit, "rows": rows,
             "best": best}  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "search.json").write_text(json.dumps(table, indent=1) + "\n")
    lines = [f"| {param} | {metric} ({task}) | n |", "|---|---|---|"]
    lines += [f"| {r[param]:g} | {r[metric]:.4f} | {r['n']} |" for r in rows]
    (out_dir / "search.md").write_text("\n".join(lines) + "\n")
    _plot(rows, param, metric, task, out_dir / "search.png")
    return table


def _plot(rows: list[dict[str, Any]], param: str, metric: str, task: str, out: Path) -> None:
    from crucible.report.plots import plt, save_figure

    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    ax.plot([r[param] for r in rows], [r[metric] for r in rows], "o-")
    ax.set_xlabel(param)
    ax.set_ylabel(f"{metric} ({task})")
    ax.set_title(f"merge search over {param}")
    ax.grid(alpha=0.3)
    save_figure(fig, out)
