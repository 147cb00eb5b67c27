"""A suite's finished runs read back: final metrics per arm and seed, at equal tokens.

Final metrics are val_loss / val_bpb from summary.json and the in-loop eval scores logged at the
last step. Only seeds finished by every arm enter the statistics, so comparisons stay paired.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from crucible.ablate.runner import run_dir_of
from crucible.ablate.stats import ALPHA, Comparison, Summary, paired_test, summarize
from crucible.ablate.suite import Suite
from crucible.train.metrics import read_metrics

VAL_METRICS = ("val_loss", "val_bpb")


def _final_metrics(run_dir: Path) -> dict[str, float] | None:
    path = run_dir / "summary.json"
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    out = {k: float(summary[k]) for k in VAL_METRICS if k in summary}
    out["tokens"] = float(summary["tokens"])
    evals = [r for r in read_metrics(run_dir, "eval") if r["step"] == summary["step"]]
    if evals:
        out.update(
            {
                k: float(v)
                for k, v in evals[-1].items()
                if "/" in k and not k.endswith("/random") and isinstance(v, int | float)
            }
        )
    return out


@dataclass
class SuiteResults:
    arms: list[str]
    seeds: list[int]  # seeds finished by every arm
    values: dict[str, dict[str, list[float]]]  # arm -> metric -> one value per seed
    metrics: list[str]
    missing: list[str] = field(default_factory=list)  # runs not finished yet

    def summary(self, arm: str, metric: str) -> Summary:
        return summarize(self.values[arm][metric], 1 - ALPHA)

    def compare(self, arm: str, metric: str, alpha: float = ALPHA) -> Comparison:
        return paired_test(metric, self.values["baseline"][metric], self.values[arm][metric], alpha)


def collect(suite: Suite, suite_dir: Path) -> SuiteResults:
    arms = suite.arm_names()
    finals: dict[tuple[str, int], dict[str, float]] = {}
    missing = []
    for seed in suite.seeds:
        for arm in arms:
            got = _final_metrics(run_dir_of(suite_dir, arm, seed))
            if got is None:
                missing.append(f"{arm}-s{seed}")
            else:
                finals[arm, seed] = got
    seeds = [s for s in suite.seeds if all((a, s) in finals for a in arms)]
    tokens = {finals[a, s]["tokens"] for a in arms for s in seeds}
    if len(tokens) > 1:
        raise ValueError(f"runs of suite {suite.name} ended at different token counts {tokens}")
    # Metrics every paired run has (an eval task may fail to load in some environment).
    common = set.intersection(*(set(finals[a, s]) for a in arms for s in seeds)) if seeds else set()
    common.discard("tokens")
    metrics = [m for m in VAL_METRICS if m in common] + sorted(common - set(VAL_METRICS))
    values = {a: {m: [finals[a, s][m] for s in seeds] for m in metrics} for a in arms}
    return SuiteResults(arms, seeds, values, metrics, missing)
