"""CLI for post-training data: `crucible chat-data` writes the synthetic chat data set."""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

from crucible.config import ConfigError


def _parse_tasks(spec: str | None) -> dict[str, float] | None:
    if not spec:
        return None
    from crucible.posttrain.synthetic import TASKS

    out: dict[str, float] = {}
    for item in spec.split(","):
        name, _, weight = item.strip().partition("=")
        if name not in TASKS:
            raise ConfigError(f"--tasks: unknown task {name!r} (known: {', '.join(TASKS)})")
        try:
            out[name] = float(weight) if weight else 1.0
        except ValueError:
            raise ConfigError(f"--tasks: weight of {name} is not a number: {weight!r}") from None
        if out[name] < 0:
            raise ConfigError(f"--tasks: weight of {name} must be >= 0")
    if not sum(out.values()):
        raise ConfigError("--tasks: at least one task needs a weight > 0")
    return out


def _cmd_chat_data(args: argparse.Namespace) -> int:
    from crucible.posttrain.conversations import write_jsonl
    from crucible.posttrain.synthetic import generate

    if args.train < 0 or args.test < 0:
        raise ConfigError("--train and --test must be >= 0")
    tasks = _parse_tasks(args.tasks)
    out = Path(args.out_dir)
    for split, n in (("train", args.train), ("test", args.test)):
        convs = generate(split, n, seed=args.seed, tasks=tasks)  # type: ignore[arg-type]
        path = out / f"{split}.jsonl"
        write_jsonl(convs, path)
        counts = Counter(c.meta["task"] for c in convs)
        modes = Counter(c.meta["mode"] for c in convs)
        detail = ", ".join(f"{t} {k}" for t, k in sorted(counts.items()))
        print(f"wrote {path}: {len(convs)} conversations ({detail}; think {modes['think']})")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "chat-data",
        help="write the offline synthetic chat data set (train/test JSONL)",
        description="Generate deterministic, synthetic chat conversations from the embedded "
        "stdlib corpus and verifiable arithmetic (docstring Q&A, name-the-function, word "
        "problems with worked reasoning in think mode, calculator tool calls, multi-turn with "
        "system prompts) and write OUT_DIR/train.jsonl and OUT_DIR/test.jsonl in the `messages` "
        "format. The test split is held out: its functions come from held-out stdlib files and "
        "its arithmetic never appears in train.",
    )
    p.add_argument("out_dir", help="directory for train.jsonl and test.jsonl")
    p.add_argument("--train", type=int, default=5000, help="training conversations")
    p.add_argument("--test", type=int, default=500, help="held-out conversations")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--tasks",
        default=None,
        help="comma-separated tasks with optional weights (default 1), e.g. "
        "arithmetic=2,tool_call (default: all five tasks in the built-in mixture)",
    )
    p.set_defaults(func=_cmd_chat_data)
