"""GRPO demonstration on CPU: held-out arithmetic reward before and after RL, over seeds, with
and without DAPO's soft overlong penalty.

    python bench/grpo_demo.py OUT [--seeds 0 1 2] [--steps 200] [--lr 1e-5] [--arms plain]

1. base: a small model pretrained briefly on the stdlib corpus (its tokenizer has chat tokens);
2. sft:  supervised fine-tuning on a + b and a - b (a >= b) with a, b < --max-n (one expression
         in six or so held out by hash), assistant-only loss, with the SFT data path and loss on
         the post-training loop (no-think replies "The answer is N.");
3. grpo: for each seed, `run_grpo` from the SFT model, plain and with the overlong penalty;
4. held-out reward (last_number verifier) before and after, greedy and the mean of
   --eval-samples sampled completions per problem (seeded by the run's seed), paired by seed
   (crucible.ablate.stats.paired_test); the completion-length curves in a plot; everything raw,
   with wall and process CPU seconds per phase, in OUT/results.json.
Each phase is skipped when its output exists (re-running continues). One thread per process
(--threads); the two arms can run as two processes (--arms plain / --arms penalty), and a last
call with both arms reuses the runs and writes results.json and the plot.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

from crucible.ablate.stats import paired_test
from crucible.atomic import write_text_atomic
from crucible.config import load_config
from crucible.data.corpora import split_of
from crucible.posttrain.conversations import Conversation, Message, write_jsonl
from crucible.posttrain.grpo_run import heldout_accuracy, read_prompts, run_grpo, with_system
from crucible.posttrain.loop import Prepared, make_run, run_loop
from crucible.posttrain.rollout import ChatPrompter
from crucible.posttrain.sft_data import SFTLoader
from crucible.posttrain.sft_loss import sft_loss
from crucible.posttrain.sft_prepare import load_sft_data
from crucible.tokenizer.train import load_tokenizer
from crucible.train.init_from import load_base
from crucible.train.metrics import console
from crucible.train.step import Loss

MODEL = ["model.vocab_size=1024", "model.hidden_size=128", "model.num_layers=4",
         "model.num_heads=4", "model.num_kv_heads=2", "model.intermediate_size=384",
         "model.max_seq_len=192"]  # fmt: skip


def base(out: Path, steps: int = 150, threads: int = 1) -> Path:
    run = out / "base"
    if (run / "summary.json").exists():
        return run
    cfg = load_config("tiny", [*MODEL, f"out_dir={out}", "name=base", f"train.steps={steps}", f"train.threads={threads}",
                               "train.seq_len=128", "train.global_batch_size=16",
                               "train.micro_batch_size=16", "train.val_every=0",
                               "checkpoint.every=0", "data.max_corpus_mb=2",
                               f"data.cache_dir={out / 'cache'}", "train.tensorboard=false",
                               "schedule.warmup_steps=15"])  # fmt: skip
    from crucible.train.trainer import train

    train(cfg)
    return run


SYSTEM = "/system_override Be brief."  # the template's verbatim system prompt: short rows
MAX_N = 30  # numbers below it; --max-n changes it
WORDING = "short"  # "What is 7 + 5?", or "story" (a word problem); --wording changes it
NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jo"]
ITEMS = ["apples", "marbles", "books", "coins", "pencils", "shells", "cards"]


def problems(split: str, max_n: int | None = None) -> list[dict]:
    """Word problems a + b and a - b (a >= b) with a, b < max_n; an expression is held out
    (test) when its hash falls in the corpus's 20% validation bucket. `reworded`: the train
    expressions with another name and item than their train wording (unseen prompts, seen sums)."""
    out, max_n = [], max_n or MAX_N
    for a in range(max_n):
        for b in range(max_n):
            for op in "+-":
                if op == "-" and a < b:
                    continue
                key = f"{a} {op} {b}"
                if (split_of(f"grpo-demo:{key}", 0.2) == "val") != (split == "test"):
                    continue
                rng = random.Random(key)
                name, items = rng.choice(NAMES), rng.choice(ITEMS)
                if split == "reworded":
                    name = rng.choice([n for n in NAMES if n != name])
                    items = rng.choice([i for i in ITEMS if i != items])
                if WORDING == "short":
                    q = f"{'Compute' if split == 'reworded' else 'What is'} {a} {op} {b}?"
                elif op == "+":
                    q = f"{name} has {a} {items} and gets {b} more. How many {items} now?"
                else:
                    q = f"{name} has {a} {items} and gives {b} away. How many {items} are left?"
                out.append({"prompt": [{"role": "user", "content": q}],
                            "answer": str(a + b if op == "+" else a - b)})  # fmt: skip
    return out


def conversation(p: dict) -> Conversation:
    msgs = (Message("system", SYSTEM), Message("user", p["prompt"][0]["content"]),
            Message("assistant", f"The answer is {p['answer']}."))  # fmt: skip
    return Conversation(msgs, None, {"enable_thinking": False})


def sft(out: Path, base_dir: Path, args: argparse.Namespace) -> Path:
    run = out / "sft"
    if (run / "summary.json").exists():
        return run
    data_path = out / "sft_train.jsonl"
    train = problems("train")
    rng = random.Random(0)
    write_jsonl([conversation(rng.choice(train)) for _ in range(args.sft_rows)], data_path)
    steps = args.sft_steps
    cfg = load_config(None, [f"out_dir={out}", "name=sft", f"train.steps={steps}",
                             f"train.threads={args.threads}",
                             "train.global_batch_size=16", "train.micro_batch_size=16",
                             "train.seq_len=96", "train.log_every=20", "train.tensorboard=false",
                             f"optim.lr={args.sft_lr}", "schedule.kind=cosine", "schedule.warmup_steps=20",
                             f"schedule.min_lr={args.sft_lr / 10}", "checkpoint.every=0",
                             "checkpoint.keep_last=1"])  # fmt: skip
    b = load_base(base_dir)
    cfg = cfg.model_copy(update={"model": b.model_cfg})
    data = load_sft_data([data_path], b.tokenizer_path, seq_len=cfg.train.seq_len)
    console.print(data.summary())
    loader = SFTLoader(data.examples, cfg.train.seq_len, cfg.train.global_batch_size,
                       cfg.train.micro_batch_size, pad_id=data.pad_id, packing=False)  # fmt: skip

    def objective(run, batch) -> Loss:  # type: ignore[no-untyped-def]
        loss = sft_loss(run.model, batch)
        return Loss(loss, {"loss": loss.detach()})

    p = Prepared(cfg, b, torch.device("cpu"), console.print)
    run_loop(make_run(p, loader, objective), resume=False)
    return run


def evaluate(run_dir: Path, args: argparse.Namespace, seed: int) -> dict[str, float]:
    """Reward on each held-out split: greedy, and the mean over `--eval-samples` completions
    per problem sampled at temperature 1 from a generator seeded by `seed` (less noisy than one
    greedy answer each; the same seed before and after RL gives common random numbers)."""
    b = load_base(run_dir)
    model = b.build().eval()
    prompter = ChatPrompter.from_tokenizer(load_tokenizer(b.tokenizer_path))
    out: dict[str, float] = {}
    for split in args.eval_splits:
        path = args.out / f"heldout-{split}.jsonl"
        if not path.exists():  # two processes (one per arm) may get here: write, then rename
            write_text_atomic(path, "".join(json.dumps(p) + "\n" for p in problems(split)))
        prompts = with_system(read_prompts(str(path), think=False), SYSTEM)[: args.heldout]
        reward, length = heldout_accuracy(model, prompter, prompts, max_new_tokens=args.max_len)
        out |= {f"{split}_reward": reward, f"{split}_length": length}
        if args.eval_samples > 0:
            reward, length = heldout_accuracy(model, prompter, prompts, max_new_tokens=args.max_len,
                                              samples=args.eval_samples, temperature=1.0, seed=seed)  # fmt: skip
            out |= {f"{split}_sampled_reward": reward, f"{split}_sampled_length": length}
    return out


class Clock:
    """Wall and process CPU seconds since creation (one thread: CPU time is core time)."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.time(), time.process_time()

    def read(self) -> dict[str, float]:
        return {"wall_s": time.time() - self.wall, "cpu_s": time.process_time() - self.cpu}


def train_prompts(out: Path) -> Path:
    path = out / "grpo_prompts.jsonl"
    # write, then rename: the other arm's process may be reading
    write_text_atomic(path, "".join(json.dumps(p) + "\n" for p in problems("train")))
    return path


def grpo(out: Path, sft_dir: Path, seed: int, penalty: bool, args: argparse.Namespace) -> Path:
    name = f"grpo-{'penalty' if penalty else 'plain'}-s{seed}"
    if (out / name / "summary.json").exists():
        return out / name
    cfg = load_config(None, [
        f"out_dir={out}", f"name={name}", f"seed={seed}", f"train.steps={args.steps}",
        f"train.threads={args.threads}",
        f"train.global_batch_size={args.prompts_per_step * args.group}",
        f"train.micro_batch_size={args.prompts_per_step * args.group}", "train.log_every=1",
        "train.tensorboard=false", f"optim.lr={args.lr}", "optim.weight_decay=0",
        f"optim.betas=[{args.betas[0]},{args.betas[1]}]",
        "schedule.kind=constant", f"schedule.warmup_steps={args.warmup}", "checkpoint.every=0",
        "spikes.policy=none", f"grpo.init_from={sft_dir}", f"grpo.prompts={train_prompts(out)}", f"grpo.group_size={args.group}",
        f"grpo.max_completion_length={args.max_len}", f"grpo.system_prompt={SYSTEM}",
        "grpo.loss_type=grpo", "grpo.scale_rewards=group", "grpo.epsilon_high=0.28",
        f"grpo.overlong_penalty={str(penalty).lower()}", f"grpo.overlong_cache={args.max_len // 2}",
        "grpo.mask_truncated=false",
    ])  # fmt: skip
    run_grpo(cfg, quiet=True)
    return out / name


def paired(before: list[float], after: list[float]) -> dict:
    cmp = paired_test("heldout_reward", before, after, lower_better=False)
    return {"before": before, "after": after, "mean_diff": cmp.diff.mean,
            "ci_low": cmp.diff.ci_low, "ci_high": cmp.diff.ci_high, "p": cmp.p,
            "verdict": cmp.verdict}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=200, help="GRPO steps per run")
    ap.add_argument("--prompts-per-step", type=int, default=4)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--max-len", type=int, default=24, help="completion tokens (GRPO and eval)")
    ap.add_argument("--lr", type=float, default=1e-5, help="GRPO learning rate")
    ap.add_argument("--betas", type=float, nargs=2, default=[0.9, 0.95],
                    help="GRPO's Adam betas; a beta1 near 1 averages the noisy gradient longer")  # fmt: skip
    ap.add_argument("--warmup", type=int, default=10,
                    help="GRPO warmup steps (a fresh Adam's first full-size steps undo SFT)")  # fmt: skip
    ap.add_argument("--base-steps", type=int, default=150)
    ap.add_argument("--sft-steps", type=int, default=1500)
    ap.add_argument("--sft-lr", type=float, default=1e-3)
    ap.add_argument("--sft-rows", type=int, default=4000, help="SFT conversations written")
    ap.add_argument("--heldout", type=int, default=100_000, help="at most this many problems")
    ap.add_argument("--eval-samples", type=int, default=8,
                    help="sampled completions per held-out problem (0: greedy only)")  # fmt: skip
    ap.add_argument("--eval-splits", nargs="+", default=["test"],
                    choices=["test", "reworded", "train"],
                    help="test: unseen sums; reworded: seen sums, unseen wording")  # fmt: skip
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads per process")
    ap.add_argument(
        "--arms",
        nargs="+",
        default=["plain", "penalty"],
        help="which arms to run (a second process can run the other one)",
    )
    ap.add_argument("--max-n", type=int, default=30, help="problems use numbers below this")
    ap.add_argument("--wording", choices=["story", "short"], default="short",
                    help="story: a word problem; short: 'What is a + b?'")  # fmt: skip
    ap.add_argument("--merge", action="store_true",
                    help="combine OUT/results-plain.json and results-penalty.json, then stop")  # fmt: skip
    ap.add_argument("--prep-only", action="store_true", help="stop after scoring the SFT model")
    args = ap.parse_args()
    global MAX_N, WORDING
    MAX_N, WORDING = args.max_n, args.wording
    out: Path = args.out
    if args.merge:
        return merge(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    clock = Clock()
    b = base(out, args.base_steps, args.threads)
    t_base = clock.read()
    s = sft(out, b, args)
    t_prep = clock.read()
    sizes = {split: len(problems(split)) for split in ("train", "test", "reworded")}
    console.print(f"problems: {sizes}")
    before = {seed: evaluate(s, args, seed) for seed in args.seeds}
    console.print(f"SFT model: {before}")
    results: dict = {"problems": sizes,
                     "before": {str(k): v for k, v in before.items()}, "runs": {},
                     "base_time": t_base, "prep_time": t_prep}  # fmt: skip
    if args.prep_only:
        (out / "prep.json").write_text(json.dumps(results, indent=1))
        return
    grpo_clock = Clock()
    arms = [a == "penalty" for a in args.arms]
    for penalty in arms:
        for seed in args.seeds:
            c = Clock()
            r = grpo(out, s, seed, penalty, args)
            t_train = c.read()
            after = evaluate(r, args, seed)
            events = [json.loads(x) for x in (r / "metrics.jsonl").read_text().splitlines()]
            curve = [{k: e.get(k) for k in ("step", "reward", "accuracy", "completion_length",
                                            "truncated")} for e in events if e["event"] == "train"]  # fmt: skip
            results["runs"][r.name] = {"seed": seed, "penalty": penalty, **after,
                                       "train_time": t_train, "time": c.read(),
                                       "curve": curve}  # fmt: skip
            console.print(f"{r.name}: {after} ({c.read()})")
    results["grpo_time"] = grpo_clock.read()
    results["args"] = {k: str(v) for k, v in vars(args).items()}
    finish(results, out, args.arms)


def finish(results: dict, out: Path, arms: list[str]) -> None:
    """Paired tests per arm and metric; results.json and the plot once both arms are in."""
    for key in arms:
        arm = [v for v in results["runs"].values() if v["penalty"] == (key == "penalty")]
        for metric in [k for k in arm[0] if k.endswith("_reward")]:
            cmp = paired([results["before"][str(v["seed"])][metric] for v in arm],
                         [v[metric] for v in arm])  # fmt: skip
            results[f"paired_{key}_{metric}"] = cmp
            console.print(f"{key} {metric}: change {cmp['mean_diff']:+.3f} (95% CI "
                          f"{cmp['ci_low']:+.3f} to {cmp['ci_high']:+.3f}, p={cmp['p']:.3g}, "
                          f"{cmp['verdict']})")  # fmt: skip
    name = "results.json" if len(arms) == 2 else f"results-{arms[0]}.json"
    (out / name).write_text(json.dumps(results, indent=1))
    if len(arms) == 2:
        plot(results, out / "grpo_length.png")


def merge(out: Path) -> None:
    """results.json from the two one-arm processes' files, without evaluating anything again."""
    missing = [a for a in ("plain", "penalty") if not (out / f"results-{a}.json").exists()]
    if missing:
        print(f"--merge: {out}/results-{missing[0]}.json is missing (run --arms {missing[0]} first)",
              file=sys.stderr)  # fmt: skip
        raise SystemExit(2)
    parts = {a: json.loads((out / f"results-{a}.json").read_text()) for a in ("plain", "penalty")}
    if parts["plain"]["before"] != parts["penalty"]["before"]:
        raise SystemExit(
            "results-plain.json and results-penalty.json score the SFT model differently"
        )
    results = {**parts["plain"], "runs": {**parts["plain"]["runs"], **parts["penalty"]["runs"]}}
    results["grpo_time_per_arm"] = {a: p["grpo_time"] for a, p in parts.items()}
    times = [p["grpo_time"] for p in parts.values()]  # the two processes ran side by side
    results["grpo_time"] = {"wall_s": max(t["wall_s"] for t in times),
                            "cpu_s": sum(t["cpu_s"] for t in times)}  # fmt: skip
    finish(results, out, ["plain", "penalty"])


def smooth(xs: list[float], k: int) -> list[float]:
    """Trailing mean over the last `k` values (one step's 32 samples are noisy)."""
    return [
        sum(xs[max(0, i - k + 1) : i + 1]) / len(xs[max(0, i - k + 1) : i + 1])
        for i in range(len(xs))
    ]


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for run in results["runs"].values():
        color = "tab:green" if run["penalty"] else "tab:red"
        steps = [c["step"] for c in run["curve"]]
        label = ("with" if run["penalty"] else "without") + " overlong penalty"
        label = label if run["seed"] == min(v["seed"] for v in results["runs"].values()) else None
        axes[0].plot(steps, [c["completion_length"] for c in run["curve"]], color=color,
                     alpha=0.7, label=label)  # fmt: skip
        axes[1].plot(steps, smooth([c["accuracy"] for c in run["curve"]], 10), color=color,
                     alpha=0.7)  # fmt: skip
    axes[0].set(xlabel="GRPO step", ylabel="mean completion length (tokens)",
                title="completion length (sampled, per step)")  # fmt: skip
    axes[1].set(xlabel="GRPO step", ylabel="training accuracy (sampled)",
                title="accuracy of the step's samples (mean of 10 steps)")  # fmt: skip
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
