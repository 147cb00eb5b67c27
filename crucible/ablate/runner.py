"""Running a suite: a cost estimate first, then every arm x seed as an ordinary run directory.

suite_dir/plan.json                 the resolved plan and the cost estimate
suite_dir/runs/<arm>-s<seed>/       ordinary run directories (crucible report works on them)
suite_dir/runs/trunk-s<seed>/       forked suites: the shared baseline run up to the fork step
suite_dir/timings.json              measured wall time per run, kept across interruptions
suite_dir/jobs/<run>.{yaml,log}     with --jobs N > 1: each run's config and its process's output

Runs go seed by seed, and within a seed (trunk,) baseline then variants, so an interrupted suite
already has complete pairs. A run with summary.json (a trunk: stopped.json) is reused; one without
resumes from its checkpoint. With `jobs` > 1 up to that many runs train at once, each in its own
`python -m crucible train` process with cores // jobs torch threads; an arm starts once its
trunk is done.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from crucible.ablate.suite import ArmPlan, Suite
from crucible.config import ConfigError, RunConfig, dump_config, load_config
from crucible.data.prepare import prepare_data
from crucible.pretrain import run_pretraining
from crucible.train.metrics import format_duration, read_metrics

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
            | {
                "train": {
                    **cfg.train.model_dump(),
                    **{"steps": steps, "log_every": 1, "val_every": 0, "stop_at": None},
                }
            }
            # From scratch: a forked arm's trunk checkpoint does not exist yet.
            | {"checkpoint": {**cfg.checkpoint.model_dump(), "every": 0, "init_from": None}}
            | {"eval": {**cfg.eval.model_dump(), "every": 0, "every_tokens": None}}
        )
        # Build (or check) the data first: a one-off cost, not part of every run.
        prepare_data(cfg.data, cfg.model.vocab_size, cfg.train.seq_len)
        t0 = time.perf_counter()
        run_pretraining(cfg, quiet=True)
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
    # A forked suite trains the trunk (the baseline up to the fork) once, then each arm's rest.
    steps = arms[0].config.train.steps
    rest = 1 - (suite.fork_step or 0) / steps
    trunk = [(arms[0], 1 - rest)] if suite.fork_step else []
    parts = [*trunk, *((a, rest) for a in arms)]
    return CostEstimate(
        runs=n * len(parts),
        tokens=round(n * sum(a.tokens * f for a, f in parts)),
        flops=n * sum(a.tokens * a.flops_per_token * f for a, f in parts),
        wall_s=n * sum(overhead_s + _time_per_run(a, fps, 0.0) * f for a, f in parts),
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
        "fork_step": suite.fork_step,
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


def _without_threads(cfg: RunConfig) -> RunConfig:
    return cfg.model_copy(update={"train": cfg.train.model_copy(update={"threads": None})})


def _check_same_config(run_dir: Path, cfg: RunConfig) -> None:
    """A reused run must be the run the suite asks for now (the suite file may have changed)."""
    try:
        saved = load_config(run_dir / "config.yaml")
    except ConfigError:
        saved = None
    # Torch threads are set per run by --jobs; they do not change what a run computes.
    if saved is None or _without_threads(saved) != _without_threads(cfg):
        raise ConfigError(
            f"{run_dir}: exists with a different config than the suite now asks for; "
            "delete it (or use another suite directory) to rerun it"
        )


@dataclass
class _Job:
    cfg: RunConfig
    label: str
    resume: bool
    after: str | None = None  # the name of a run (a trunk) that must finish first
    done_file: str = "summary.json"


def _plan_jobs(suite: Suite, suite_dir: Path, log: Callable[[str], None]) -> list[_Job]:
    """Every run to train, in order; finished runs are reused (and their configs checked)."""
    cfgs: list[tuple[RunConfig, str | None, str]] = []
    for seed in suite.seeds:
        trunk = None
        if suite.fork_step is not None:
            tcfg = suite.trunk_config(seed, runs_dir(suite_dir))
            cfgs.append((tcfg, None, "stopped.json"))
            trunk = tcfg.name
        for arm in suite.arm_names():
            cfgs.append((suite.config_for(arm, seed, runs_dir(suite_dir)), trunk, "summary.json"))
    jobs = []
    for i, (cfg, after, done_file) in enumerate(cfgs, 1):
        run_dir = cfg.run_dir
        label = f"[{i}/{len(cfgs)}] {run_dir.name}"
        if (run_dir / done_file).is_file():
            _check_same_config(run_dir, cfg)
            log(f"{label}: finished earlier, reused")
            continue
        resume = run_dir.is_dir() and any(run_dir.iterdir())
        if resume:
            _check_same_config(run_dir, cfg)
        jobs.append(_Job(cfg, label, resume, after, done_file))
    return jobs


def _record(suite_dir: Path, timings: dict[str, float], job: _Job, seconds: float) -> None:
    name = job.cfg.run_dir.name
    # An interrupted run's earlier time is lost; we add what we see.
    timings[name] = timings.get(name, 0.0) * job.resume + seconds
    (suite_dir / "timings.json").write_text(json.dumps(timings, indent=1))


def _finished_line(job: _Job) -> str:
    path = job.cfg.run_dir / job.done_file
    if job.done_file == "stopped.json":
        return f"{job.label}: trunk saved at step {json.loads(path.read_text())['step']}"
    val = json.loads(path.read_text()).get("val_loss")
    return f"{job.label}: val_loss {val:.4f}" if val is not None else f"{job.label}: finished"


def run_suite(
    suite: Suite,
    suite_dir: Path,
    quiet: bool = True,
    log: Callable[[str], None] = print,
    jobs: int = 1,
) -> dict[str, float]:
    """Train every (trunk and) arm x seed; returns the wall seconds of each run by name."""
    suite_dir = Path(suite_dir)
    if jobs < 1:
        raise ValueError(f"--jobs {jobs} must be >= 1")
    timings = _load_timings(suite_dir)
    todo = _plan_jobs(suite, suite_dir, log)
    if jobs == 1:
        for job in todo:
            log(f"{job.label}: {'resuming' if job.resume else 'training'}")
            t0 = time.perf_counter()
            run_pretraining(job.cfg, resume=job.resume, quiet=quiet)
            _record(suite_dir, timings, job, time.perf_counter() - t0)
            log(_finished_line(job))
        return timings
    _run_parallel(todo, suite_dir, timings, jobs, quiet, log)
    return timings


def _run_parallel(
    todo: list[_Job],
    suite_dir: Path,
    timings: dict[str, float],
    jobs: int,
    quiet: bool,
    log: Callable[[str], None],
) -> None:
    """Up to `jobs` runs at once, each a `python -m crucible train` process."""
    threads = max(1, (os.cpu_count() or 1) // jobs)
    job_dir = suite_dir / "jobs"
    job_dir.mkdir(parents=True, exist_ok=True)
    pending = list(todo)
    waiting_on = {j.cfg.name for j in todo}  # runs not finished yet (arms wait for trunks)
    running: list[tuple[_Job, subprocess.Popen, float, Path]] = []
    failed: list[str] = []
    while pending or running:
        while pending and len(running) < jobs and not failed:
            ready = next((j for j in pending if j.after not in waiting_on), None)
            if ready is None:
                break
            pending.remove(ready)
            cfg = ready.cfg
            if cfg.train.threads is None:
                cfg = cfg.model_copy(
                    update={"train": cfg.train.model_copy(update={"threads": threads})}
                )
            path = job_dir / f"{cfg.name}.yaml"
            path.write_text(dump_config(cfg))
            logfile = job_dir / f"{cfg.name}.log"
            cmd = [sys.executable, "-m", "crucible", "train", str(path)]
            cmd += ["--resume"] if ready.resume else []
            with logfile.open("w") as out:
                proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
            log(f"{ready.label}: {'resuming' if ready.resume else 'training'} (pid {proc.pid})")
            running.append((ready, proc, time.perf_counter(), logfile))
        if not running:
            break  # only jobs whose trunk failed are left
        time.sleep(0.2)
        for item in list(running):
            job, proc, t0, logfile = item
            if proc.poll() is None:
                continue
            running.remove(item)
            if proc.returncode != 0:
                tail = "\n".join(logfile.read_text().splitlines()[-15:])
                log(f"{job.label}: FAILED (exit {proc.returncode}); log {logfile}:\n{tail}")
                failed.append(job.cfg.name)
                continue
            waiting_on.discard(job.cfg.name)
            _record(suite_dir, timings, job, time.perf_counter() - t0)
            if not quiet:
                log(logfile.read_text().rstrip())
            log(_finished_line(job))
    if failed:
        raise RuntimeError(
            f"{len(failed)} run(s) failed: {', '.join(failed)} (logs in {job_dir}); rerun the "
            "suite to resume"
        )


def clean_suite(suite_dir: Path) -> None:
    """Remove all runs of a suite (used by --fresh)."""
    shutil.rmtree(runs_dir(suite_dir), ignore_errors=True)
    shutil.rmtree(Path(suite_dir) / "jobs", ignore_errors=True)
    (Path(suite_dir) / "timings.json").unlink(missing_ok=True)
