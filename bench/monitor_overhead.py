"""Monitoring overhead: the default monitoring against none, on the tiny CPU shape, in one run.

Both arms train the same config (the `tiny` preset on the embedded corpus) from the same seed;
they alternate in blocks so that a change in machine load hits both. Step time is the wall time
between the first and last logged step of a block (everything the loop does, callbacks
included), divided by the steps between them. The default monitoring takes its detailed
snapshot every 100 steps, so each block is a multiple of 100 steps.

    python bench/monitor_overhead.py                 # 2 blocks per arm of 100 steps
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
from crucible.train.metrics import read_metrics
from crucible.train.trainer import train

ARMS = {"none": ["monitor.enabled=false"], "default": []}


def block(arm: str, steps: int, out_dir: str, i: int, threads: int) -> float:
    """Seconds per step of one block (warm-up excluded: timing starts at the first log line)."""
    cfg = load_config(
        "tiny",
        [
            f"name={arm}-{i}",
            f"out_dir={out_dir}",
            f"train.steps={steps + 10}",
            "train.log_every=10",
            "train.val_every=0",
            "checkpoint.every=0",
            "train.tensorboard=false",
            f"train.threads={threads}",
            *ARMS[arm],
        ],
    )
    train(cfg, quiet=True)
    rows = read_metrics(cfg.run_dir, "train")
    first, last = rows[0], rows[-1]
    return (last["time"] - first["time"]) / (last["step"] - first["step"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100, help="timed steps per block")
    ap.add_argument("--blocks", type=int, default=2, help="blocks per arm")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()
    times: dict[str, list[float]] = {arm: [] for arm in ARMS}
    with tempfile.TemporaryDirectory() as out:
        for i in range(args.blocks):
            for arm in ARMS if i % 2 == 0 else reversed(ARMS):
                times[arm].append(block(arm, args.steps, out, i, args.threads))
                print(f"block {i} {arm:>8}: {times[arm][-1] * 1000:8.1f} ms/step", flush=True)
    med = {arm: statistics.median(v) for arm, v in times.items()}
    overhead = med["default"] / med["none"] - 1
    print("\n| monitoring | median ms/step | vs none |\n|---|---|---|")
    for arm in ARMS:
        print(f"| {arm} | {med[arm] * 1000:.1f} | {med[arm] / med['none']:.3f}x |")
    print(f"\ndefault monitoring overhead: {overhead:+.2%} (target <= 2%)")
    result = {
        "bench": "monitor_overhead",
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        "torch": torch.__version__,
        "threads": args.threads,
        "steps_per_block": args.steps,
        "seconds_per_step": times,
        "median_seconds_per_step": med,
        "overhead": overhead,
        "date": time.strftime("%Y-%m-%d"),
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
