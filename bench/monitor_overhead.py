"""Monitoring overhead: the default monitoring against none, on the tiny CPU shape, in one run.

Both arms train the same config (the `tiny` preset on the embedded corpus) from the same seed;
they alternate in blocks so that a change in machine load hits both. A block times `--steps`
steps after 10 warm-up steps: everything the loop does, callbacks included. It reports wall time
and process CPU time per step; on a shared machine the CPU time (one thread) is the one to trust,
because other processes stretch wall time at random. The default monitoring takes its detailed
snapshot every 100 steps, so each block is a multiple of 100 steps.

    python bench/monitor_overhead.py                 # 2 blocks per arm of 100 steps, 1 thread
    python bench/monitor_overhead.py --blocks 3 --steps 200 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time

import torch

from crucible.config import load_config
from crucible.train.callbacks import Callback
from crucible.train.trainer import train

ARMS = {"none": ["monitor.enabled=false"], "default": []}
WARMUP = 10


class Clock(Callback):
    """Wall and CPU time from the end of the warm-up to the end of the last step."""

    def on_step_end(self, run, result) -> None:
        if result.step == WARMUP:
            self.start = (time.perf_counter(), time.process_time())
        self.end = (time.perf_counter(), time.process_time())


def block(arm: str, steps: int, out_dir: str, i: int, threads: int) -> tuple[float, float]:
    """(wall, CPU) seconds per step of one block, warm-up excluded."""
    cfg = load_config(
        "tiny",
        [
            f"name={arm}-{i}",
            f"out_dir={out_dir}",
            f"train.steps={steps + WARMUP}",
            "train.log_every=10",
            "train.val_every=0",
            "checkpoint.every=0",
            "train.tensorboard=false",
            f"train.threads={threads}",
            *ARMS[arm],
        ],
    )
    clock = Clock()
    train(cfg, quiet=True, callbacks=[clock])
    return tuple((e - s) / steps for s, e in zip(clock.start, clock.end))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100, help="timed steps per block")
    ap.add_argument("--blocks", type=int, default=2, help="blocks per arm")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()
    times: dict[str, list[tuple[float, float]]] = {arm: [] for arm in ARMS}
    with tempfile.TemporaryDirectory() as out:
        for i in range(args.blocks):
            for arm in ARMS if i % 2 == 0 else reversed(ARMS):
                times[arm].append(block(arm, args.steps, out, i, args.threads))
                wall, cpu = times[arm][-1]
                print(f"block {i} {arm:>8}: wall {wall * 1e3:7.1f} ms/step  cpu {cpu * 1e3:7.1f}")
    med = {
        arm: tuple(statistics.median(t[k] for t in v) for k in (0, 1)) for arm, v in times.items()
    }
    print("\n| monitoring | wall ms/step | CPU ms/step | wall vs none | CPU vs none |")
    print("|---|---|---|---|---|")
    for arm in ARMS:
        (w, c), (w0, c0) = med[arm], med["none"]
        print(f"| {arm} | {w * 1e3:.1f} | {c * 1e3:.1f} | {w / w0:.3f}x | {c / c0:.3f}x |")
    overhead = med["default"][1] / med["none"][1] - 1
    print(f"\ndefault monitoring overhead (CPU time): {overhead:+.2%} (target <= 2%)")
    result = {
        "bench": "monitor_overhead",
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        "torch": torch.__version__,
        "threads": args.threads,
        "steps_per_block": args.steps,
        "seconds_per_step": times,
        "median_seconds_per_step_wall_cpu": med,
        "overhead": overhead,
        "date": time.strftime("%Y-%m-%d"),
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
