"""`crucible ablate SUITE`: check, estimate, run and report an ablation suite.

crucible ablate suite.yaml                 plan + estimate, run every arm x seed, report
crucible ablate attention --dry-run        only the plan (diffs, params, FLOPs, warnings, cost)
crucible ablate suite.yaml --report-only   rewrite the report from the runs that exist
crucible ablate suite.yaml --jobs 4        up to 4 runs at once (separate processes)
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from crucible.ablate.stats import ALPHA
from crucible.argtypes import open_fraction, positive_int

ABLATE_HELP = "run an ablation suite (baseline + variants x seeds) and report verdicts"


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `ablate` command to crucible's argument parser."""
    p = subparsers.add_parser("ablate", help=ABLATE_HELP, description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("suite", help="a suite YAML file or an example suite name (see docs/ablations)")
    p.add_argument(
        "--out-dir",
        default=None,
        help="suite directory (default: the suite's out_dir, else runs/ablations/<suite name>)",
    )
    p.add_argument("--dry-run", action="store_true", help="print the plan and estimate only")
    p.add_argument(
        "--no-warmup",
        action="store_true",
        help="estimate wall time from a default throughput instead of 3 measured steps",
    )
    p.add_argument("--report-only", action="store_true", help="only (re)write the report")
    p.add_argument(
        "--alpha", type=open_fraction, default=ALPHA, help="significance level of verdicts"
    )
    p.add_argument("--verbose", action="store_true", help="show each run's training log")
    p.add_argument(
        "--jobs",
        type=positive_int,
        default=1,
        help="train up to N runs at once, as separate processes with cores // N threads each",
    )
    p.set_defaults(func=run_command)
    return p


def run_command(args: argparse.Namespace) -> int:
    from crucible.ablate.report import write_suite_report
    from crucible.ablate.runner import (
        duration,
        estimate_cost,
        measure_warmup,
        run_suite,
        write_plan,
    )
    from crucible.ablate.suite import format_plan, load_suite, plan_arms

    if args.jobs < 1:
        raise ValueError(f"--jobs {args.jobs} must be >= 1")
    if not 0 < args.alpha < 1:
        raise ValueError(f"--alpha {args.alpha} must be between 0 and 1")
    suite = load_suite(args.suite)
    arms = plan_arms(suite)  # every config error surfaces here, before any training
    suite_dir = Path(args.out_dir or suite.out_dir or Path("runs") / "ablations" / suite.name)
    print(format_plan(suite, arms))
    if args.report_only:
        md, html = write_suite_report(suite, arms, suite_dir, args.alpha)
        print(f"wrote {md}, {html}")
        return 0

    fps, overhead = None, 0.0
    if not args.no_warmup:
        print(f"measuring throughput: {3} warm-up steps of the baseline ...")
        fps, overhead = measure_warmup(arms[0])
    cost = estimate_cost(suite, arms, fps, overhead)
    print(
        f"estimate: {cost.runs} runs, {cost.tokens:,} tokens, {cost.flops:.3g} training FLOPs, "
        f"~{duration(cost.wall_s)} at {cost.flops_per_s:.3g} FLOP/s"
        + ("" if cost.measured else " (default throughput, not measured)")
    )
    if args.dry_run:
        return 0
    write_plan(suite_dir, suite, arms, cost)
    t0 = time.perf_counter()
    timings = run_suite(suite, suite_dir, quiet=not args.verbose, jobs=args.jobs)
    print(
        f"done in {duration(time.perf_counter() - t0)} (estimated "
        f"{duration(cost.wall_s)}; {len(timings)} runs trained by this suite in "
        f"{duration(sum(timings.values()))})"
    )
    md, html = write_suite_report(suite, arms, suite_dir, args.alpha)
    print(f"wrote {md}, {html}")
    return 0
