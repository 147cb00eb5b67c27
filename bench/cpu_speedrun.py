"""CPU speedrun: time to a target validation loss, our `tiny` recipe against a nanoGPT recipe.

All arms train in one process, interleaved step by step (step i of every arm, then step i + 1),
so they share the machine's load. They see the same training windows in the same order, the
same batch size, the same LR schedule (the `tiny` preset's) and the same validation windows:

* ours: `crucible.model.Transformer` from the `tiny` preset, our optimizer (AdamW, weight decay
  on 2-D weights), our fused linear cross-entropy.
* nanogpt: `transformers.GPT2LMHeadModel` of matched size (LayerNorm, GELU, learned positions,
  MHA, tied head, no dropout), AdamW with weight decay on 2-D weights only, as nanoGPT does on
  CPU (no fused optimizer), plain cross-entropy over the logits.
* best: `tiny` plus the overrides in --best (leave it empty to run without a third arm).

Time per arm counts training steps only (validation excluded), measured both as wall time and as
process CPU time; with one thread the CPU time is robust to other processes on the machine.

    python bench/cpu_speedrun.py --threads 1 --json out.json --plot out.png
    python bench/cpu_speedrun.py --quick          # a few steps: smoke test
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from crucible.config import RunConfig, load_config
from crucible.data.prepare import prepare_data
from crucible.data.shards import ShardSet
from crucible.model import Transformer
from crucible.train.optim import build_optimizer
from crucible.train.schedule import lr_at
from crucible.train.setup import autocast_dtype, compile_model


@dataclass
class Arm:
    name: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    loss_fn: object  # (model, inputs, targets) -> scalar loss
    cfg: RunConfig
    params: int
    wall: float = 0.0  # training seconds so far
    cpu: float = 0.0
    tokens: int = 0
    step_wall: list[float] = field(default_factory=list)
    curve: list[dict] = field(default_factory=list)


def ours_loss(model, x, y):
    return model(x, y).loss


def gpt2_loss(model, x, y):
    logits = model(input_ids=x).logits
    return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), y.reshape(-1))


def build_ours(name: str, cfg: RunConfig, compiled: bool) -> Arm:
    torch.manual_seed(cfg.seed)
    model = Transformer(cfg.model)
    opt = build_optimizer(model, cfg.optim, torch.device("cpu"))
    if compiled:
        compile_model(model)
    return Arm(name, model, opt, ours_loss, cfg, model.num_params())


def build_gpt2(cfg: RunConfig, compiled: bool) -> Arm:
    """nanoGPT's recipe at the size of `tiny`: GPT-2 block with 4x MLP, tied head, no dropout."""
    from transformers import GPT2Config, GPT2LMHeadModel

    m = cfg.model
    torch.manual_seed(cfg.seed)
    config = GPT2Config(
        vocab_size=m.vocab_size,
        n_positions=cfg.train.seq_len,
        n_embd=m.hidden_size,
        n_layer=m.num_layers,
        n_head=m.num_heads,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=True,
    )
    config._attn_implementation = "sdpa"
    model = GPT2LMHeadModel(config)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    o = cfg.optim
    groups = [
        {"params": decay, "weight_decay": o.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps)
    if compiled:
        model = torch.compile(model)
    params = sum(p.numel() for p in model.parameters())
    return Arm("nanogpt", model, opt, gpt2_loss, cfg, params)


def train_windows(shards: ShardSet, steps: int, batch: int, seq: int, seed: int):
    """The same random (seq + 1)-token windows, step by step, for every arm."""
    rng = np.random.default_rng(seed)
    n = shards.num_tokens - seq - 1
    for _ in range(steps):
        starts = rng.integers(0, n, size=batch)
        yield torch.from_numpy(
            np.stack([shards.read(int(s), int(s) + seq + 1).astype(np.int64) for s in starts])
        )


def val_windows(shards: ShardSet, batches: int, batch: int, seq: int) -> list[torch.Tensor]:
    """Consecutive non-overlapping windows from the start of the validation shards."""
    need = batches * batch * (seq + 1)
    if shards.num_tokens < need:
        raise SystemExit(f"validation set has {shards.num_tokens} tokens; {need} needed")
    toks = torch.from_numpy(shards.read(0, need).astype(np.int64))
    return list(toks.view(batches, batch, seq + 1))


@torch.no_grad()
def evaluate(arm: Arm, windows: list[torch.Tensor], amp) -> float:
    arm.model.eval()
    total = 0.0
    with torch.autocast("cpu", dtype=amp) if amp else nullcontext():
        for w in windows:
            total += float(arm.loss_fn(arm.model, w[:, :-1], w[:, 1:]))
    arm.model.train()
    return total / len(windows)


def train_one_step(arm: Arm, step: int, xy: torch.Tensor, amp) -> None:
    cfg = arm.cfg
    lr = lr_at(step, cfg.train.steps, cfg.optim.lr, cfg.schedule)
    for g in arm.optimizer.param_groups:
        g["lr"] = lr
    w0, c0 = time.perf_counter(), time.process_time()
    with torch.autocast("cpu", dtype=amp) if amp else nullcontext():
        loss = arm.loss_fn(arm.model, xy[:, :-1], xy[:, 1:])
    loss.backward()
    torch.nn.utils.clip_grad_norm_(arm.model.parameters(), cfg.optim.clip_grad or math.inf)
    arm.optimizer.step()
    arm.optimizer.zero_grad(set_to_none=True)
    dw, dc = time.perf_counter() - w0, time.process_time() - c0
    arm.wall += dw
    arm.cpu += dc
    arm.tokens += xy.shape[0] * (xy.shape[1] - 1)
    arm.step_wall.append(dw)


def time_to(curve: list[dict], target: float, key: str) -> float | None:
    """First time the validation loss reaches `target`, interpolated between evaluations."""
    prev = None
    for point in curve:
        if point["val_loss"] <= target:
            if prev is None:
                return point[key]
            f = (prev["val_loss"] - target) / (prev["val_loss"] - point["val_loss"])
            return prev[key] + f * (point[key] - prev[key])
        prev = point
    return None


def plot(arms: list[Arm], out: Path, target: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in ((axes[0], "cpu", "process CPU s"), (axes[1], "wall", "wall s")):
        for arm in arms:
            ax.plot([p[key] for p in arm.curve], [p["val_loss"] for p in arm.curve], "o-",
                    label=f"{arm.name} ({arm.params / 1e6:.2f}M)")  # fmt: skip
        ax.axhline(target, color="gray", ls="--", lw=0.8, label=f"target {target:.3f}")
        ax.set_xlabel(f"training time ({label})")
        ax.set_ylabel("validation loss")
        ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--steps", type=int, default=None, help="default: the tiny preset's")
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--val-batches", type=int, default=None, help="default: the tiny preset's")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--compile", action="store_true", help="torch.compile every arm")
    ap.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"])
    ap.add_argument("--set", action="append", default=[], help="override for every arm")
    ap.add_argument("--best", default="", help="space-separated overrides of tiny for arm (c)")
    ap.add_argument("--target", type=float, default=None,
                    help="target validation loss (default: the nanogpt arm's final loss)")  # fmt: skip
    ap.add_argument("--quick", action="store_true", help="smoke test: 3 steps, tiny shapes")
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.abspath(".cache/inductor"))

    overrides = list(args.set)
    if args.quick:
        overrides += ["train.steps=3", "schedule.warmup_steps=1", "train.global_batch_size=2",
                      "train.micro_batch_size=2", "train.seq_len=32", "model.max_seq_len=32",
                      "data.max_corpus_mb=0.6", "model.vocab_size=512", "train.val_batches=1",
                      "model.hidden_size=64", "model.num_layers=2", "model.intermediate_size=128"]  # fmt: skip
        args.eval_every = 1
    base = load_config("tiny", overrides)
    steps = args.steps or base.train.steps
    base = load_config("tiny", [*overrides, f"train.steps={steps}"])
    amp = autocast_dtype(args.dtype, torch.device("cpu"))
    seq, batch = base.train.seq_len, base.train.global_batch_size
    data = prepare_data(base.data, base.model.vocab_size, seq, quiet=True)
    train = ShardSet(data.train_dir)
    val = val_windows(
        ShardSet(data.val_dir), args.val_batches or base.train.val_batches, batch, seq
    )

    arms = [build_ours("ours", base, args.compile), build_gpt2(base, args.compile)]
    if args.best:
        best = load_config("tiny", [*overrides, f"train.steps={steps}", *args.best.split()])
        arms.append(build_ours("best", best, args.compile or best.train.compile))
    header = (
        f"# cpu speedrun: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{args.threads} thread(s), torch {torch.__version__}, amp {amp}, "
        f"{steps} steps x {batch} x {seq} tokens, val {len(val)} x {batch} x {seq} tokens, "
        f"compile {args.compile}, best {args.best!r}, load average {os.getloadavg()}"
    )
    print(header, flush=True)
    for arm in arms:
        arm.curve.append(dict(step=0, tokens=0, wall=0.0, cpu=0.0,
                              val_loss=evaluate(arm, val, amp)))  # fmt: skip
    for step, xy in enumerate(train_windows(train, steps, batch, seq, base.seed)):
        for arm in arms:
            train_one_step(arm, step, xy, amp)
        if (step + 1) % args.eval_every == 0 or step + 1 == steps:
            for arm in arms:
                arm.curve.append(dict(step=step + 1, tokens=arm.tokens, wall=arm.wall,
                                      cpu=arm.cpu, val_loss=evaluate(arm, val, amp)))  # fmt: skip
            print(f"step {step + 1:4d}  " + "  ".join(
                f"{a.name} {a.curve[-1]['val_loss']:.4f} ({a.cpu:.1f} cpu-s, {a.wall:.1f} s)"
                for a in arms) + f"  load {os.getloadavg()[0]:.1f}", flush=True)  # fmt: skip

    ref = next(a for a in arms if a.name == "nanogpt")
    target = args.target if args.target is not None else ref.curve[-1]["val_loss"]
    rows = []
    print(f"\ntarget validation loss {target:.4f}")
    print("| arm | params | tok/s (wall, median step) | tok/s (CPU time) | final val loss "
          "| CPU-s to target | wall-s to target | CPU time / nanogpt |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    ref_cpu = time_to(ref.curve, target, "cpu")
    for arm in arms:
        # The first steps include warm-up (and compilation): the median step is the steady rate.
        med = float(np.median(arm.step_wall[min(2, len(arm.step_wall) - 1) :]))
        tps_wall = batch * seq / med
        tps_cpu = arm.tokens / arm.cpu
        t_cpu, t_wall = time_to(arm.curve, target, "cpu"), time_to(arm.curve, target, "wall")
        ratio = t_cpu / ref_cpu if t_cpu is not None and ref_cpu else None
        rows.append(dict(arm=arm.name, params=arm.params, tokens_per_s_wall=tps_wall,
                         tokens_per_s_cpu=tps_cpu, final_val_loss=arm.curve[-1]["val_loss"],
                         cpu_s_to_target=t_cpu, wall_s_to_target=t_wall,
                         ratio_to_nanogpt=ratio, curve=arm.curve))  # fmt: skip

        def fmt(v, spec=".1f"):
            return "not reached" if v is None else format(v, spec)

        print(f"| {arm.name} | {arm.params / 1e6:.2f}M | {tps_wall:,.0f} | {tps_cpu:,.0f} | "
              f"{arm.curve[-1]['val_loss']:.4f} | {fmt(t_cpu)} | {fmt(t_wall)} | "
              f"{fmt(ratio, '.2f')} |")  # fmt: skip
    print(f"# load average at end {os.getloadavg()}")
    result = dict(header=header, target=target, args=vars(args), rows=rows,
                  load_average_end=os.getloadavg())  # fmt: skip
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
    if args.plot:
        plot(arms, Path(args.plot), target)
    return result


if __name__ == "__main__":
    main()
