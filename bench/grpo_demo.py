"""GRPO demonstration on CPU: held-out arithmetic reward before and after RL, over seeds, with
and without DAPO's soft overlong penalty.

    python bench/grpo_demo.py OUT [--seeds 0 1 2] [--steps 40]

1. base: a small model pretrained briefly on the stdlib corpus (its tokenizer has chat tokens);
2. sft:  supervised fine-tuning on small-number word problems (a + b, a - b with a, b < 20;
         one expression in five held out), assistant-only loss, with the SFT data path and loss
         on the post-training loop (no-think replies "The answer is N.");
3. grpo: for each seed, `run_grpo` from the SFT model, plain and with the overlong penalty;
4. held-out greedy reward (last_number verifier) on the held-out expressions before and after, paired by
   seed (crucible.ablate.stats.paired_test), the completion-length curves in a plot, and
   everything raw in OUT/results.json.
Each phase is skipped when its output exists (re-running continues).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from crucible.ablate.stats import paired_test, summarize
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


def base(out: Path) -> Path:
    run = out / "base"
    if (run / "summary.json").exists():
        return run
    cfg = load_config("tiny", [*MODEL, f"out_dir={out}", "name=base", "train.steps=150",
                               "train.seq_len=128", "train.global_batch_size=16",
                               "train.micro_batch_size=16", "train.val_every=0",
                               "checkpoint.every=0", "data.max_corpus_mb=2",
                               f"data.cache_dir={out / 'cache'}", "train.tensorboard=false",
                               "schedule.warmup_steps=15"])  # fmt: skip
    from crucible.train.trainer import train

    train(cfg)
    return run


SYSTEM = "/system_override Be brief."  # the template's verbatim system prompt: short rows
MAX_N = 20  # numbers below it; --max-n changes it
NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jo"]
ITEMS = ["apples", "marbles", "books", "coins", "pencils", "shells", "cards"]


def problems(split: str, max_n: int | None = None) -> list[dict]:
    """Word problems a + b and a - b (a >= b) with a, b < max_n; an expression is held out
    (test) when its hash falls in the corpus's 20% validation bucket."""
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
                if op == "+":
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


def sft(out: Path, base_dir: Path, steps: int) -> Path:
    run = out / "sft"
    if (run / "summary.json").exists():
        return run
    data_path = out / "sft_train.jsonl"
    train = problems("train")
    rng = random.Random(0)
    write_jsonl([conversation(rng.choice(train)) for _ in range(4000)], data_path)
    cfg = load_config(None, [f"out_dir={out}", "name=sft", f"train.steps={steps}",
                             "train.global_batch_size=16", "train.micro_batch_size=16",
                             "train.seq_len=96", "train.log_every=20", "train.tensorboard=false",
                             "optim.lr=2e-3", "schedule.kind=cosine", "schedule.warmup_steps=20",
                             "schedule.min_lr=2e-4", "checkpoint.every=0",
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


def evaluate(run_dir: Path, n: int) -> tuple[float, float]:
    b = load_base(run_dir)
    model = b.build().eval()
    prompter = ChatPrompter.from_tokenizer(load_tokenizer(b.tokenizer_path))
    path = run_dir.parent / "heldout.jsonl"
    if not path.exists():
        path.write_text("".join(json.dumps(p) + "\n" for p in problems("test")))
    prompts = with_system(read_prompts(str(path), think=False), SYSTEM)[:n]
    return heldout_accuracy(model, prompter, prompts, max_new_tokens=24)


def train_prompts(out: Path) -> Path:
    path = out / "grpo_prompts.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in problems("train")))
    return path


def grpo(out: Path, sft_dir: Path, seed: int, penalty: bool, args: argparse.Namespace) -> Path:
    name = f"grpo-{'penalty' if penalty else 'plain'}-s{seed}"
    if (out / name / "summary.json").exists():
        return out / name
    cfg = load_config(None, [
        f"out_dir={out}", f"name={name}", f"seed={seed}", f"train.steps={args.steps}",
        f"train.global_batch_size={args.prompts_per_step * args.group}",
        f"train.micro_batch_size={args.prompts_per_step * args.group}", "train.log_every=1",
        "train.tensorboard=false", f"optim.lr={args.lr}", "optim.weight_decay=0",
        "schedule.kind=constant", "schedule.warmup_steps=0", "checkpoint.every=0",
        "spikes.policy=none", f"grpo.init_from={sft_dir}", f"grpo.prompts={train_prompts(out)}", f"grpo.group_size={args.group}",
        f"grpo.max_completion_length={args.max_len}", f"grpo.system_prompt={SYSTEM}",
        "grpo.loss_type=grpo", "grpo.scale_rewards=group", "grpo.epsilon_high=0.28",
        f"grpo.overlong_penalty={str(penalty).lower()}", f"grpo.overlong_cache={args.max_len // 2}",
        "grpo.mask_truncated=false",
    ])  # fmt: skip
    run_grpo(cfg, quiet=True)
    return out / name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--prompts-per-step", type=int, default=2)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--max-len", type=int, default=24)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--sft-steps", type=int, default=200)
    ap.add_argument("--heldout", type=int, default=200)
    ap.add_argument(
        "--arms",
        nargs="+",
        default=["plain", "penalty"],
        help="which arms to run (a second process can run the other one)",
    )
    ap.add_argument("--max-n", type=int, default=20, help="problems use numbers below this")
    args = ap.parse_args()
    global MAX_N
    MAX_N = args.max_n
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    torch.set_num_threads(2)
    b = base(out)
    s = sft(out, b, args.sft_steps)
    t_prep = time.time() - t0
    before = evaluate(s, args.heldout)
    console.print(f"SFT model: held-out reward {before[0]:.3f}, mean length {before[1]:.1f}")
    results: dict = {"before": {"reward": before[0], "length": before[1]}, "runs": {},
                     "prep_seconds": t_prep}  # fmt: skip
    t1 = time.time()
    arms = [a == "penalty" for a in args.arms]
    for penalty in arms:
        for seed in args.seeds:
            t = time.time()
            r = grpo(out, s, seed, penalty, args)
            after = evaluate(r, args.heldout)
            events = [json.loads(x) for x in (r / "metrics.jsonl").read_text().splitlines()]
            curve = [{k: e.get(k) for k in ("step", "reward", "accuracy", "completion_length",
                                            "truncated")} for e in events if e["event"] == "train"]  # fmt: skip
            results["runs"][r.name] = {"seed": seed, "penalty": penalty, "reward": after[0],
                                       "length": after[1], "seconds": time.time() - t,
                                       "curve": curve}  # fmt: skip
            console.print(f"{r.name}: held-out reward {after[0]:.3f}, length {after[1]:.1f} "
                          f"({time.time() - t:.0f} s)")  # fmt: skip
    results["grpo_seconds"] = time.time() - t1
    results["args"] = {k: str(v) for k, v in vars(args).items()}
    for penalty in arms:
        arm = [v for v in results["runs"].values() if v["penalty"] == penalty]
        cmp = paired_test("heldout_reward", [before[0]] * len(arm), [v["reward"] for v in arm],
                          lower_better=False)  # fmt: skip
        key = "penalty" if penalty else "plain"
        results[f"paired_{key}"] = {"mean_diff": cmp.diff.mean, "ci_low": cmp.diff.ci_low,
                                    "ci_high": cmp.diff.ci_high, "p": cmp.p, "verdict": cmp.verdict,
                                    "after": summarize([v["reward"] for v in arm]).__dict__}  # fmt: skip
        console.print(f"{key}: reward change {cmp.diff.mean:+.3f} (95% CI {cmp.diff.ci_low:+.3f} "
                      f"to {cmp.diff.ci_high:+.3f}, p={cmp.p:.3g}, {cmp.verdict})")  # fmt: skip
    if len(arms) < 2:
        return  # partial: a later run with both arms reuses these runs and writes the results
    (out / "results.json").write_text(json.dumps(results, indent=1))
    plot(results, out / "grpo_length.png")


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
        axes[1].plot(steps, [c["accuracy"] for c in run["curve"]], color=color, alpha=0.7)
    axes[0].set(xlabel="GRPO step", ylabel="mean completion length (tokens)",
                title="completion length (sampled, per step)")  # fmt: skip
    axes[1].set(xlabel="GRPO step", ylabel="training accuracy (sampled)",
                title="verifier accuracy of the step's samples")  # fmt: skip
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
