"""Post-training commands: `chat-data`, `chat-inspect` here, `merge` in merge_commands.py."""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

from crucible.argtypes import check_out_path, nonneg_int, positive_int
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
    check_out_path(out, "OUT_DIR")
    for split, n in (("train", args.train), ("test", args.test)):
        convs = generate(split, n, seed=args.seed, tasks=tasks)  # type: ignore[arg-type]
        path = out / f"{split}.jsonl"
        write_jsonl(convs, path)
        counts = Counter(c.meta["task"] for c in convs)
        modes = Counter(c.meta["mode"] for c in convs)
        detail = ", ".join(f"{t} {k}" for t, k in sorted(counts.items()))
        print(f"wrote {path}: {len(convs)} conversations ({detail}; think {modes['think']})")
    return 0


def _highlight(text: str, spans: list[tuple[int, int]]) -> str:
    """The rendered text with the supervised spans between [[ and ]]."""
    out, pos = [], 0
    for a, b in spans:
        out += [text[pos:a], "[[", text[a:b], "]]"]
        pos = b
    return "".join([*out, text[pos:]])


def _cmd_chat_inspect(args: argparse.Namespace) -> int:
    import numpy as np

    from crucible.posttrain.sft_data import SFTLoader
    from crucible.posttrain.sft_prepare import load_sft_data

    data = load_sft_data(
        [args.data], args.tokenizer, seq_len=args.seq_len, loss=args.loss,
        truncation=args.truncation, template=args.template, split=args.split,
    )  # fmt: skip
    convs = data.reads[0].conversations
    for k in args.show or []:
        if not 0 <= k < len(convs):
            raise ConfigError(f"--show {k}: there are {len(convs)} conversations")
        r = data.encoder.template.render(convs[k], **data.encoder.token_variables)
        print(f"--- {convs[k].name} (supervised text in [[ ]])\n{_highlight(r.text, r.spans)}")
    print(data.summary())
    lengths = np.array([len(e.ids) for e in data.examples])
    p50, p95 = np.percentile(lengths, [50, 95])
    print(f"tokens per conversation: median {p50:.0f}, p95 {p95:.0f}, max {lengths.max()}")
    if args.seq_len:
        for packing in (True, False):
            loader = SFTLoader(data.examples, args.seq_len, 1, 1, pad_id=data.pad_id,
                               packing=packing)  # fmt: skip
            st = loader.stats()
            print(
                f"{'packed' if packing else 'padded'} rows of {args.seq_len}: {st['rows']} rows, "
                f"{st['fill']:.1%} of positions are tokens, {st['supervised_share']:.1%} of "
                "tokens supervised"
            )
    return 0


def _cmd_sft(args: argparse.Namespace) -> int:
    from crucible.posttrain.sft_run import load_sft_config, run_sft
    from crucible.train.distributed import finish, launched_by_torchrun

    cfg = load_sft_config(args.config, args.overrides)
    run_sft(cfg, resume=args.resume)
    if launched_by_torchrun():
        finish(0)
    return 0


def _cmd_eval_chat(args: argparse.Namespace) -> int:
    import platform

    from crucible.posttrain.chat_eval import (
        ChatModel,
        evaluate_chat,
        format_metrics,
        load_eval_conversations,
        write_results,
    )

    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit must be >= 1, got {args.limit}")
    run_dir = Path(args.run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{run_dir}: not a run directory (no config.yaml)")
    if args.data:
        convs = load_eval_conversations(args.data, args.limit)
        source = args.data
    else:
        from crucible.posttrain.synthetic import generate

        convs = generate("test", args.limit or 200, seed=args.seed)
        source = f"synthetic test split, seed {args.seed}"
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    chat = ChatModel.from_run(run_dir, args.checkpoint)
    kwargs = {"today_date": args.today_date}
    result = evaluate_chat(chat, convs, args.max_new_tokens, template_kwargs=kwargs)
    m = result.metrics()
    print(f"eval-chat {run_dir} on {source} ({len(result.replies)} conversations, greedy):")
    print(format_metrics(m))
    if args.out:
        info = {"run_dir": str(run_dir), "data": source, "max_new_tokens": args.max_new_tokens,
                "python": platform.python_version()}  # fmt: skip
        write_results(args.out, result, info)
        print(f"wrote {args.out}")
    return 0


def _cmd_recipe(args: argparse.Namespace) -> int:
    from crucible.posttrain.recipe import run_recipe

    run_recipe(args.recipe, force=args.force, out_dir=args.out_dir, dry_run=args.dry_run)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from crucible.posttrain.merge_commands import register as register_merge
    from crucible.posttrain.rl_commands import register as register_rl

    register_merge(sub)
    register_rl(sub)
    p = sub.add_parser(
        "sft",
        help="supervised fine-tuning of a base model on conversations (chat template, packing)",
        description="Fine-tune sft.base (a run directory, a checkpoint or a Hugging Face "
        "directory) on conversations (sft.train_data; default: the built-in synthetic chat "
        "data) with the chat template, loss on assistant turns (or the last completion), "
        "best-fit-decreasing packing with document masking, and explicit truncation. It runs on "
        "the training loop: checkpoints, metrics, validation (loss on sft.val_data), spike "
        "guard, --resume and torchrun (DDP/FSDP) work as for `crucible train`. The run "
        "directory gets chat_template.jinja. See docs/post-training.md, SFT.",
    )
    p.add_argument("config", help="a YAML run config with an `sft:` section")
    p.add_argument(
        "overrides",
        nargs="*",
        help="dotted overrides, e.g. sft.base=runs/quickstart train.steps=200",
    )
    p.add_argument(
        "--resume", action="store_true", help="continue the run from its latest intact checkpoint"
    )
    p.set_defaults(func=_cmd_sft)
    p = sub.add_parser(
        "eval-chat",
        help="measure a chat model on held-out conversations (format, modes, task accuracy)",
        description="Generate one assistant turn (greedy) for each held-out conversation's "
        "first prompt and report: replies ending with the end-of-turn token, mode following "
        "(a closed, non-empty <think> block in think mode, none in no-think mode), and on the "
        "synthetic tasks arithmetic accuracy, calculator tool calls (the call, then the answer "
        "after the tool's result) and name-the-function accuracy. Works on base models too "
        "(the built-in template is used when the run has none).",
    )
    p.add_argument("run_dir", help="a run directory (latest checkpoint unless --checkpoint)")
    p.add_argument("--data", default=None, help="conversations JSONL (default: synthetic test)")
    p.add_argument("--limit", type=int, default=None, help="first N conversations (default: all;"
                   " 200 synthetic ones without --data)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic test split")
    p.add_argument("--checkpoint", default=None, help="step_N directory (default: latest)")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument(
        "--today-date",
        default="01 January 2026",
        help="today_date of records that set none (fixed: results are reproducible)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", default=None, help="write metrics and every reply to this JSON file")
    p.set_defaults(func=_cmd_eval_chat)

    p = sub.add_parser(
        "recipe",
        help="run a post-training recipe end to end (mid-training, SFT, APO, merge, eval) and "
        "report the stages side by side",
        description="Run the stages of a recipe YAML in order, each one an existing command "
        "(train, sft, pref-data, dpo, merge, chat-data) started from the previous stage's run "
        "directory, then evaluate every model on the same held-out data (eval-chat, and "
        "`crucible eval --tasks`) and write OUT_DIR/report.md, stages.json and stages.png. "
        "The whole recipe is validated before anything runs (exit 2 naming the stage and "
        "field). A rerun skips the stages that are done and resumes an interrupted one. See "
        "docs/post-training.md, The recipe end to end, and examples/posttrain/recipe-tiny.yaml.",
    )
    p.add_argument("recipe", help="the recipe YAML")
    p.add_argument("--out-dir", default=None, help="output directory (default: the recipe's "
                   "out_dir, else runs/<name>)")  # fmt: skip
    p.add_argument("--force", action="store_true", help="redo every stage and evaluation")
    p.add_argument(
        "--dry-run", action="store_true", help="validate and print the command lines, run nothing"
    )
    p.set_defaults(func=_cmd_recipe)

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
    p.add_argument("--train", type=positive_int, default=5000, help="training conversations")
    p.add_argument("--test", type=nonneg_int, default=500, help="held-out conversations")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--tasks",
        default=None,
        help="comma-separated tasks with optional weights (default 1), e.g. "
        "arithmetic=2,tool_call (default: all five tasks in the built-in mixture)",
    )
    p.set_defaults(func=_cmd_chat_data)

    p = sub.add_parser(
        "chat-inspect",
        help="validate, render and measure chat data with a tokenizer and the chat template",
        description="Read conversations (JSONL in the `messages` format, a Parquet/Arrow/JSON "
        "file or a `save_to_disk` directory), report broken records by name and reason, "
        "tokenize them with the chat template and report tokens, supervised share and lengths; "
        "with --seq-len also truncation and packed/padded rows. --show N prints conversation N "
        "as rendered, with the supervised text between [[ and ]].",
    )
    p.add_argument("data", help="conversations file or dataset directory")
    p.add_argument("--tokenizer", required=True, help="tokenizer.json (or its directory)")
    p.add_argument("--template", default=None, help="a Jinja chat template (default: built-in)")
    p.add_argument("--split", default="train", help="split of a dataset directory")
    p.add_argument("--loss", choices=["assistant", "completion"], default="assistant")
    p.add_argument(
        "--seq-len", type=positive_int, default=None, help="row length to truncate and pack to"
    )
    p.add_argument("--truncation", choices=["drop", "keep_start", "error"], default="drop")
    p.add_argument(
        "--show", type=nonneg_int, action="append", help="print conversation N (repeatable)"
    )
    p.set_defaults(func=_cmd_chat_inspect)
