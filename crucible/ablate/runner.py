"""Running a suite: a cost estimate first, then every arm x seed as an ordinary run directory.

suite_dir/plan.json                 the resolved plan and the cost estimate
suite_dir/runs/<arm>-s<seed>/       ordinary run directories (crucible report works on them)
suite_dir/timings.json              measured wall time per run, kept across interruptions

Runs go seed by seed, and within a seed baseline then variants, so an interrupted suite already
has complete pairs. A run with summary.json is reused; one without resumes from its checkpoint.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from crucible.ablate.suite import ArmPlan, Suite
from crucible.config import ConfigError, RunConfig, load_config
from crucible.data.prepare import prepare_data
from crucible.train.metrics import format_duration, read_metrics
from crucible.train.trainer import train

DEFAULT_FLOPS_PER_S = 2e10  # a CPU-ish guess, used only when no warm-up is measured
WARMUP_STEPS = 3


def duration(seconds: float) -> str:
    """Short suites take seconds; "00:00" would hide them."""
    return f"{seconds:.1f}s" if seconds < 60 else format_duration(seconds)


@dataclass
class CostEstimate:
    runs: int
    tokens: int
    flops: float
    wall_s: float
    flops_per_s: float
    measured: bool  # from a warm-up run, or the default throughput


def _time_per_run(arm: ArmPlan, flops_per_s: float, overhead_s: float) -> float:
    cfg = arm.config.train
    train_s = arm.tokens * arm.flops_per_token / flops_per_s
    # Periodic validation is forward-only (a third of the training FLOPs per token).
    n_val = cfg.steps // cfg.val_every if cfg.val_every else 0
    val_tokens = cfg.val_batches * cfg.micro_batch_size * cfg.seq_len
    return overhead_s + train_s + n_val * val_tokens * arm.flops_per_token / 3 / flops_per_s


def measure_warmup(arm: ArmPlan, steps: int = WARMUP_STEPS) -> tuple[float, float]:
    """Train the baseline for a few steps in a scratch dir: (FLOPs/s, fixed overhead per run).

    The fixed part (data check, model build, final validation, checkpoint) is the total wall
    time minus the time of the steps themselves.
    """
    with tempfile.TemporaryDirectory(prefix="crucible-ablate-warmup-") as tmp:
        cfg = arm.config.model_copy(deep=True)
        cfg = RunConfig.model_validate(
            {**cfg.model_dump(), "name": "warmup", "out_dir": tmp}
            | {"train": {**cfg.train.model_dump(), "steps": steps, "log_every": 1, "val_every": 0}}
            | {"checkpoint": {**cfg.checkpoint.model_dump(), "every": 0}}
            | {"eval": {**cfg.eval.model_dump(), "every": 0, "every_tokens": None}}
        )
        # Build (or check) the data first: a one-off cost, not part of every run.
        prepare_data(cfg.data, cfg.model.vocab_size, cfg.train.seq_len)
        t0 = time.perf_counter()
        train(cfg, quiet=True)
        wall = time.perf_counter() - t0
        rows = read_metrics(Path(tmp) / "warmup", "train")
    # The first step pays one-off costs (allocation, autotuning); use the later ones.
    later = rows[1:] or rows
    tok_s = sum(r["tokens_per_s"] for r in later) / len(later)
    step_s = cfg.train.tokens_per_step / tok_s
    return tok_s * arm.flops_per_token, max(wall - steps * step_s, 0.0)


def estimate_cost(
    suite: Suite, arms: list[ArmPlan], flops_per_s: float | None, overhead_s: float = 0.0
) -> CostEstimate:
    measured = flops_per_s is not None
    fps = flops_per_s or DEFAULT_FLOPS_PER_S
    n = len(suite.seeds)
    return CostEstimate(
        runs=n * len(arms),
        tokens=n * sum(a.tokens for a in arms),
        flops=n * sum(a.tokens * a.flops_per_token for a in arms),
        wall_s=n * sum(_time_per_run(a, fps, overhead_s) for a in arms),
        flops_per_s=fps,
        measured=measured,
    )


def runs_dir(suite_dir: Path) -> Path:
    return Path(suite_dir) / "runs"


def run_dir_of(suite_dir: Path, arm: str, seed: int) -> Path:
    return runs_dir(suite_dir) / f"{arm}-s{seed}"


def write_plan(suite_dir: Path, suite: Suite, arms: list[ArmPlan], cost: CostEstimate) -> Path:
    suite_dir.mkdir(parents=True, exist_ok=True)
    plan = {
        "suite": suite.name,
        "source": suite.source,
        "config": suite.config,
        "baseline_overrides": suite.baseline_overrides,
        "seeds": suite.seeds,
        "arms": [
            {
                "name": a.name,
                "overrides": suite.overrides_of(a.name),
                "changes": {k: list(v) for k, v in a.changes.items()},
                "params": a.params,
                "param_delta": a.param_delta,
                "flops_per_token": a.flops_per_token,
                "tokens": a.tokens,
                "warnings": a.warnings,
            }
            for a in arms
        ],
        "estimate": asdict(cost),
    }
    path = suite_dir / "plan.json"
    path.write_text(json.dumps(plan, indent=1))
    return path


def _load_timings(suite_dir: Path) -> dict[str, float]:
    path = suite_dir / "timings.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _check_same_config(run_dir: Path, cfg: RunConfig) -> None:
    """A reused run must be the run the suite asks for now (the suite file may have changed)."""
    try:
        saved = load_config(run_dir / "config.yaml")
    except ConfigError:
        saved = None
    if saved != cfg:
        raise ConfigError(
            f"{run_dir}: exists with a different config than the suite now asks for; "
            "delete it (or use another suite directory) to rerun it"
        )


def run_suite(
    suite: Suite,
    suite_dir: Path,
    quiet: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, float]:
    """Train every arm x seed (sequentially); returns the wall seconds of each run by name."""
    suite_dir = Path(suite_dir)
    timings = _load_timings(suite_dir)
    total = len(suite.seeds) * len(suite.arm_names())
    i = 0
    for seed in suite.seeds:
        for arm in suite.arm_names():
            i += 1
            cfg = suite.config_for(arm, seed, runs_dir(suite_dir))
            run_dir = cfg.run_dir
            label = f"[{i}/{total}] {run_dir.name}"
            if (run_dir / "summary.json").is_file():
                _check_same_config(run_dir, cfg)
                log(f"{label}: finished earlier, reused")
                continue
            resume = run_dir.is_dir() and any(run_dir.iterdir())
            if resume:
                _check_same_config(run_dir, cfg)
            log(f"{label}: {'resuming' if resume else 'training'}")
            t0 = time.perf_counter()
            result = train(cfg, resume=resume, quiet=quiet)
            # An interrupted run's earlier time is lost; we add what we see.
            timings[run_dir.name] = timings.get(run_dir.name, 0.0) * resume + (
                time.perf_counter() - t0
            )
            (suite_dir / "timings.json").write_text(json.dumps(timings, indent=1))
            if result.val:
                log(f"{label}: val_loss {result.val['val_loss']:.4f}")
    return timings


def clean_suite(suite_dir: Path) -> None:
    """Remove all runs of a suite (used by --fresh)."""
    shutil.rmtree(runs_dir(suite_dir), ignore_errors=True)
    (Path(suite_dir) / "timings.json").unlink(missing_ok=True)
