"""Training-step speed on CPU: our `tiny` step against the nanoGPT recipe, with an op profile.

Both models come from bench/cpu_speedrun.py (matched sizes, the optimizers each arm trains
with). One process, interleaved steps on the same random batch; tokens/s from the median step in
wall time and from process CPU time (robust to other processes when running one thread).

    python bench/cpu_step.py --threads 1,2 --modes eager,compiled --repeat 5
    python bench/cpu_step.py --profile ours --threads 1     # op-by-op table of our step
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_speedrun import build_gpt2, build_ours  # noqa: E402

from crucible.config import load_config  # noqa: E402
from crucible.train.setup import autocast_dtype  # noqa: E402


def one_step(arm, xy, amp) -> None:
    with torch.autocast("cpu", dtype=amp) if amp else torch.autocast("cpu", enabled=False):
        loss = arm.loss_fn(arm.model, xy[:, :-1], xy[:, 1:])
    loss.backward()
    torch.nn.utils.clip_grad_norm_(arm.model.parameters(), 1.0)
    arm.optimizer.step()
    arm.optimizer.zero_grad(set_to_none=True)


def measure(arms, xy, amp, steps: int, warmup: int) -> dict[str, tuple[float, float]]:
    wall: dict[str, list[float]] = {a.name: [] for a in arms}
    cpu: dict[str, list[float]] = {a.name: [] for a in arms}
    for i in range(warmup + steps):
        for arm in arms:  # interleaved: both arms see the same load
            w0, c0 = time.perf_counter(), time.process_time()
            one_step(arm, xy, amp)
            if i >= warmup:
                wall[arm.name].append(time.perf_counter() - w0)
                cpu[arm.name].append(time.process_time() - c0)
    ntok = xy.shape[0] * (xy.shape[1] - 1)
    return {
        a.name: (ntok / statistics.median(wall[a.name]), ntok / statistics.median(cpu[a.name]))
        for a in arms
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--modes", default="eager,compiled")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="measure each cell this many times; the summary row is the median ratio "
        "(the ratio moves by several %% between runs on a shared VM)",
    )
    ap.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"])
    ap.add_argument("--set", action="append", default=[], help="override of tiny for ours")
    ap.add_argument("--profile", choices=["ours", "nanogpt"], default=None)
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--ce-chunk", type=int, default=None, help="ours: rows per loss chunk")
    args = ap.parse_args()
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.abspath(".cache/inductor"))
    cfg = load_config("tiny", args.set)
    amp = autocast_dtype(args.dtype, torch.device("cpu"))
    B, T = cfg.train.global_batch_size, cfg.train.seq_len
    xy = torch.randint(
        0, cfg.model.vocab_size, (B, T + 1), generator=torch.Generator().manual_seed(0)
    )
    print(f"# cpu step: {os.cpu_count()} cores, torch {torch.__version__}, amp {amp}, "
          f"{B} x {T} tokens, overrides {args.set}, ce chunk {args.ce_chunk}, load average {os.getloadavg()}")  # fmt: skip
    if args.profile:
        torch.set_num_threads(int(args.threads.split(",")[0]))
        arm = build_ours("ours", cfg, False) if args.profile == "ours" else build_gpt2(cfg, False)
        for _ in range(args.warmup):
            one_step(arm, xy, amp)
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                one_step(arm, xy, amp)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
        return
    print("| threads | mode | ours tok/s (wall) | nanogpt tok/s (wall) | ratio (wall) "
          "| ours tok/s (CPU) | nanogpt tok/s (CPU) | ratio (CPU) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    summary: list[tuple[int, str, list[tuple[float, float]]]] = []
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        for mode in args.modes.split(","):
            compiled = mode == "compiled"
            arms = [build_ours("ours", cfg, compiled), build_gpt2(cfg, compiled)]
            arms[0].model.loss_chunk_rows = args.ce_chunk
            ratios = []
            for _ in range(args.repeat):
                r = measure(arms, xy, amp, args.steps, args.warmup)
                (ow, oc), (nw, nc) = r["ours"], r["nanogpt"]
                ratios.append((ow / nw, oc / nc))
                print(f"| {threads} | {mode} | {ow:,.0f} | {nw:,.0f} | {ow / nw:.2f}x | {oc:,.0f} | "
                      f"{nc:,.0f} | {oc / nc:.2f}x |", flush=True)  # fmt: skip
            summary.append((threads, mode, ratios))
    if args.repeat > 1:
        print(
            "\n| threads | mode | runs | median ratio (wall) | range | median ratio (CPU) | range |"
        )
        print("|---|---|---|---|---|---|---|")
        for threads, mode, ratios in summary:
            w, c = [r[0] for r in ratios], [r[1] for r in ratios]
            print(f"| {threads} | {mode} | {len(ratios)} | {statistics.median(w):.2f}x | "
                  f"{min(w):.2f}-{max(w):.2f} | {statistics.median(c):.2f}x | {min(c):.2f}-{max(c):.2f} |")  # fmt: skip
    print(f"# load average at end {os.getloadavg()}")


if __name__ == "__main__":
    main()
