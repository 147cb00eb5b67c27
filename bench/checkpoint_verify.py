"""Cost of durable, verified checkpoints for a preset's model + AdamW state, one process.

Times `save_checkpoint` (write, fsync, SHA-256 manifest, rename) and `verify_checkpoint` with
verify="size" (a stat per file) and verify="hash" (every byte read and hashed).

    python bench/checkpoint_verify.py --preset tiny --repeats 3
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from crucible.config import load_config
from crucible.model import Transformer
from crucible.train.checkpoint import save_checkpoint, step_dir, verify_checkpoint


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    args = ap.parse_args()
    cfg = load_config(args.preset)
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    opt = torch.optim.AdamW(model.parameters())
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()  # gives the optimizer its moments
    root = Path(tempfile.mkdtemp(prefix="crucible-ckpt-bench-", dir=args.dir))
    try:
        times: dict[str, list[float]] = {"save": [], "size": [], "hash": []}
        for i in range(1, args.repeats + 1):
            t0 = time.perf_counter()
            save_checkpoint(root, i, model, opt, {"world_size": 1}, keep_last=1)
            times["save"].append(time.perf_counter() - t0)
            for mode in ("size", "hash"):
                t0 = time.perf_counter()
                assert verify_checkpoint(step_dir(root, i), mode) == []
                times[mode].append(time.perf_counter() - t0)
        d = step_dir(root, args.repeats)
        nbytes = sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
        print(f"{args.preset}: checkpoint {nbytes / 1e6:.1f} MB ({args.repeats} repeats, median)")
        for name, ts in times.items():
            med = statistics.median(ts)
            rate = "" if name == "size" else f"  {nbytes / 1e9 / med:6.2f} GB/s"
            print(f"  {name:<5} {med:8.3f} s{rate}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
