"""`crucible <command>`: parse arguments, call one function per command, print clear errors."""

from __future__ import annotations

import argparse
import errno
import os
import sys
import traceback
from pathlib import Path

from crucible.argtypes import fraction, nonneg_float, nonneg_int, positive_int
from crucible.config import ConfigError, config_warnings, dump_config, load_config, preset_names

CONFIG_HELP = (
    "a YAML config file or a shipped preset name ({}). A file may start with `base: PRESET` "
    "to inherit a preset"
)
OVERRIDES_HELP = (
    "dotted overrides applied after the file, e.g. optim.lr=3e-4 model.num_layers=12 "
    "train.steps=1000 (values are parsed as YAML)"
)


def _cmd_train(args: argparse.Namespace) -> int:
    from crucible.pretrain import run_pretraining
    from crucible.train.distributed import finish, launched_by_torchrun

    cfg = load_config(args.config, args.overrides)
    _warn(cfg, "train")
    if cfg.sft is not None:
        raise ConfigError(
            f"{args.config}: has an `sft:` section; fine-tune with `crucible sft {args.config}`"
        )
    if args.supervise:
        from crucible.train.supervisor import supervise

        return supervise(
            cfg, [args.config, *args.overrides], args.resume, args.max_restarts, args.backoff
        )
    run_pretraining(cfg, resume=args.resume)
    if launched_by_torchrun():
        finish(0)
    return 0


def _warn(cfg, command: str) -> None:
    for line in config_warnings(cfg):
        print(f"crucible {command}: warning: {line}", file=sys.stderr)


def _cmd_preflight(args: argparse.Namespace) -> int:
    from crucible.pretrain import preflight
    from crucible.train.distributed import finish, launched_by_torchrun
    from crucible.train.preflight import print_table

    cfg = load_config(args.config, args.overrides)
    checks, info = preflight(cfg, full=args.full)
    failed = [c for c in checks if c.status == "fail"]
    if info.is_main:
        print_table(checks, f"preflight of {cfg.name}" + (" (full)" if args.full else ""))
        if failed:
            names = ", ".join(c.name for c in failed)
            print(f"crucible preflight: {len(failed)} check(s) failed: {names}", file=sys.stderr)
    code = 2 if failed else 0
    if launched_by_torchrun():
        finish(code)
    return code


def _cmd_quickstart(args: argparse.Namespace) -> int:
    from crucible.quickstart import quickstart

    quickstart(args.overrides, out_dir=args.out_dir, chat=args.chat)
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from crucible.model import generate_text
    from crucible.runs import load_run_model
    from crucible.tokenizer.train import eos_id, load_tokenizer

    model, _, ckpt = load_run_model(Path(args.run_dir), args.checkpoint)
    tok = load_tokenizer(Path(args.run_dir) / "tokenizer.json")
    gen = torch.Generator().manual_seed(args.seed)
    for i in range(args.num_samples):
        text = generate_text(
            model,
            tok,
            args.prompt,
            args.max_new_tokens,
            eos_id(tok),
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            generator=gen,
            token_healing=args.token_healing,
        )
        print(args.prompt + text)
        if i < args.num_samples - 1:
            print("-" * 40)
    print(f"(from {ckpt})", file=sys.stderr)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from crucible.model import export_hf
    from crucible.model.hf import check_export_dir
    from crucible.runs import load_run_model

    run_dir = Path(args.run_dir)
    out = Path(args.out) if args.out else run_dir / "hf"
    check_export_dir(out, protect=[run_dir], flag="--out")
    model, _, ckpt = load_run_model(run_dir, args.checkpoint)
    tok = run_dir / "tokenizer.json"
    chat = run_dir / "chat_template.jinja"  # chat models (SFT runs) ship their template
    export_hf(
        model,
        out,
        tokenizer_path=str(tok) if tok.exists() else None,
        chat_template=chat.read_text(encoding="utf-8") if chat.is_file() and tok.exists() else None,
    )
    print(f"exported {ckpt} -> {out} (load with AutoModelForCausalLM.from_pretrained)")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from crucible.report.plots import plot_loss_curve
    from crucible.report.run_report import write_run_report

    run_dir = Path(args.run_dir)
    if not (run_dir / "metrics.jsonl").is_file():
        raise FileNotFoundError(f"{run_dir}: no metrics.jsonl (not a run directory?)")
    plot = plot_loss_curve(run_dir)
    md, html = write_run_report(run_dir)
    print(f"wrote {plot}, {md}, {html}")
    return 0


def _cmd_count_params(args: argparse.Namespace) -> int:
    from crucible.plan.flops import train_flops_per_token
    from crucible.plan.params import count_params

    cfg = load_config(args.config, args.overrides)
    p = count_params(cfg.model)
    moe = cfg.model.moe
    active = (
        f", {p.active:,} active per token (top-{moe.top_k} of {moe.num_experts})" if moe else ""
    )
    print(f"{cfg.name}: {p.total:,} parameters{active}")
    for name, n in p.as_dict().items():
        if name != "total":
            print(f"  {name:<10} {n:>15,}  {n / p.total:6.1%}")
    fpt = train_flops_per_token(cfg.model, cfg.train.seq_len)
    n = "N = active matmul parameters" if moe else "N = matmul parameters"
    print(f"training FLOPs per token at seq {cfg.train.seq_len}: {fpt:.4g} (6N + attention, {n})")
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    _warn(cfg, "config")
    print(dump_config(cfg), end="")
    return 0


def _cmd_presets(args: argparse.Namespace) -> int:
    from crucible.plan.params import count_params

    for name in preset_names():
        cfg = load_config(name)
        print(f"{name:<24} {count_params(cfg.model).total / 1e6:10.2f}M params")
    return 0


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `crucible CMD: error: ... (see --help)`."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    presets = ", ".join(preset_names())
    parser = Parser(
        prog="crucible",
        description="Crucible: plan, tokenize, pretrain, evaluate and export small LLMs.",
        epilog="Start with `crucible quickstart`; every command has its own --help.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(p: argparse.ArgumentParser) -> None:
        p.add_argument("config", help=CONFIG_HELP.format(presets))
        p.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)

    p = sub.add_parser(
        "train",
        help="pretrain a model from a config",
        description="Pretrain a model. One process by default; under `torchrun --nproc_per_node N "
        "-m crucible train ...` it trains with DDP or FSDP2 (distributed.strategy). Writes "
        "runs/<name>/ with config.yaml, metrics.jsonl, checkpoints/ and summary.json.",
    )
    with_config(p)
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue runs/<name> from its latest intact checkpoint (bit-exact on CPU)",
    )
    p.add_argument(
        "--supervise",
        action="store_true",
        help="run training in a child process and restart it from the last intact checkpoint "
        "when it crashes, with exponential backoff (see --max-restarts, --backoff)",
    )
    p.add_argument(
        "--max-restarts", type=nonneg_int, default=5, help="--supervise: restarts before giving up"
    )
    p.add_argument(
        "--backoff",
        type=float,
        default=5.0,
        help="--supervise: seconds before the first restart, doubled after each (max 300)",
    )
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser(
        "preflight",
        help="check a config before training: a pass/warn/fail table",
        description="Check a run before it spends its budget: batch arithmetic, the learning "
        "rate against the schedule, seq_len against the model, tokenizer/vocabulary/shards, "
        "tokens planned against tokens available, memory fit on this device. --full also "
        "builds the model: same initial weights on every rank (under torchrun), a short "
        "throughput test against the planner, a checkpoint round trip, the eval tasks load. "
        "Exits 2 when a check fails. `crucible train` runs the fast checks first.",
    )
    with_config(p)
    p.add_argument(
        "--full", action="store_true", help="also the checks that build and run the model"
    )
    p.set_defaults(func=_cmd_preflight)

    p = sub.add_parser(
        "quickstart",
        help="the whole path on the embedded corpus in a few minutes (no network)",
        description="Train a tokenizer on the Python standard library, tokenize it into shards, "
        "pretrain the `tiny-speedrun` preset, report validation bits-per-byte, sample three "
        "functions from `def ` with their Python shape, export to the Hugging Face layout and "
        "reload it with transformers. Output: runs/quickstart/.",
    )
    p.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    p.add_argument("--out-dir", default="runs", help="parent of the run directory")
    p.add_argument(
        "--chat",
        action="store_true",
        help="then fine-tune the base into a chat model (SFT, preset sft-tiny, on the synthetic "
        "chat data) in OUT_DIR/quickstart-chat and print a short chat demo",
    )
    p.set_defaults(func=_cmd_quickstart)

    p = sub.add_parser(
        "generate",
        help="sample text from a run's checkpoint (KV cache)",
        description="Sample continuations of a prompt from a run directory's latest checkpoint.",
    )
    p.add_argument("run_dir", help="a run directory, e.g. runs/quickstart")
    p.add_argument("--prompt", default="", help="text to continue")
    p.add_argument("--max-new-tokens", type=positive_int, default=100)
    p.add_argument("--temperature", type=nonneg_float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=positive_int, default=None, help="keep the k most likely tokens")
    p.add_argument(
        "--top-p", type=fraction, default=None, help="nucleus sampling threshold, in (0, 1]"
    )
    p.add_argument("--num-samples", type=positive_int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint", default=None, help="step_N directory (default: latest)")
    p.add_argument(
        "--no-token-healing",
        dest="token_healing",
        action="store_false",
        help="feed the prompt's tokens as they are; by default the last token is re-chosen "
        "by the model among tokens that extend its text, so a prompt ending in a space "
        "('def ') continues like training text ('def main') instead of after a bare space",
    )
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser(
        "export",
        help="write a checkpoint in the Hugging Face layout",
        description="Export safetensors + config.json + tokenizer files that "
        "transformers.AutoModelForCausalLM loads (Llama, or SmolLM3 when NoPE layers are used).",
    )
    p.add_argument("run_dir")
    p.add_argument("--out", default=None, help="output directory (default: RUN_DIR/hf)")
    p.add_argument("--checkpoint", default=None, help="step_N directory (default: latest)")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser(
        "report",
        help="loss curve and Markdown/HTML report of a run directory",
        description="(Re)write RUN_DIR/loss.png, report.md and report.html from metrics.jsonl; "
        "works on unfinished runs too.",
    )
    p.add_argument("run_dir")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser(
        "count-params",
        help="exact parameter count and FLOPs/token of a config, without building it",
    )
    with_config(p)
    p.set_defaults(func=_cmd_count_params)

    p = sub.add_parser("config", help="print the resolved config (file + overrides)")
    with_config(p)
    p.set_defaults(func=_cmd_config)

    p = sub.add_parser("presets", help="list the shipped presets")
    p.set_defaults(func=_cmd_presets)

    # Command groups of the other lifecycle steps live beside their code.
    from crucible.ablate.commands import register as register_ablate
    from crucible.data.commands import register as register_data
    from crucible.evaluate.commands import register as register_eval
    from crucible.infra.commands import register as register_infra
    from crucible.plan.commands import register as register_plan
    from crucible.posttrain.commands import register as register_posttrain
    from crucible.serve.commands import register as register_serve

    register_data(sub)
    register_eval(sub)
    register_plan(sub)
    register_infra(sub)
    register_ablate(sub)
    register_serve(sub)
    register_posttrain(sub)
    from crucible.completion import register as register_completion

    register_completion(sub)
    _add_examples(parser)
    return parser


# One example per command, shown at the end of its --help (commands that set their own epilog
# with an example keep it). tests/test_cli.py checks that every command has one.
EXAMPLES = {
    "train": "crucible train tiny train.steps=1000 name=tiny-1k",
    "quickstart": "crucible quickstart train.steps=100",
    "generate": 'crucible generate runs/quickstart --prompt "def main(" --top-p 0.9',
    "export": "crucible export runs/quickstart --out exports/quickstart",
    "report": "crucible report runs/quickstart",
    "count-params": "crucible count-params smollm3-3b",
    "config": "crucible config tiny optim.lr=1e-3",
    "presets": "crucible presets",
    "tokenizer": "crucible tokenizer train stdlib --out tok --vocab-size 8192",
    "tokenizer train": "crucible tokenizer train corpus/*.txt --out tok --vocab-size 8192",
    "tokenizer eval": "crucible tokenizer eval mine=tok/tokenizer.json --corpus en=stdlib",
    "data": "crucible data process pipeline.yaml",
    "data process": "crucible data process pipeline.yaml",
    "data tokenize": "crucible data tokenize processed --tokenizer tok/tokenizer.json --out shards",
    "data mixture": "crucible data mixture mixture.yaml --max-epochs 4",
    "data inspect": "crucible data inspect shards/train --tokenizer tok/tokenizer.json",
    "eval": "crucible eval runs/quickstart --tasks early,arc_easy=data/arc_easy.jsonl",
    "plan hardware": "crucible plan hardware h100 --json -",
    "plan roofline": "crucible plan roofline smollm3-3b --gpu h100 --peak-tflops 720",
    "plan compass": "crucible plan compass --brief brief.yaml --out decision.md",
    "plan scaling": "crucible plan scaling fit runs/s1 runs/s2 runs/s3 runs/s4 runs/s5",
    "plan scaling fit": "crucible plan scaling fit runs/s* --plot fit.png",
    "bench": "crucible bench matmul --dtypes bf16,fp32 --json matmul.json",
    "bench matmul": "crucible bench matmul --dtypes bf16,fp32 --json matmul.json",
    "bench copy": "crucible bench copy --bytes 256M",
    "bench storage": "crucible bench storage /scratch --size 1G",
    "bench loader": "crucible bench loader shards/train --seq-len 2048 --batch 8",
    "doctor": "crucible doctor --json doctor.json",
    "ablate": "crucible ablate attention --dry-run",
    "chat": "crucible chat runs/sft --no-think",
    "serve": "crucible serve runs/sft --port 8000",
    "merge": "crucible merge merge.yaml --out runs/merged --hf",
    "chat-data": "crucible chat-data data/chat --train 5000 --test 500",
    "chat-inspect": "crucible chat-inspect data/chat --tokenizer tok/tokenizer.json --show 0",
    "preflight": "crucible preflight smollm3-3b --full",
    "sft": "crucible sft sft-tiny sft.base=runs/quickstart train.steps=300",
    "eval-chat": "crucible eval-chat runs/sft-tiny --data data/chat/test.jsonl",
    "recipe": "crucible recipe examples/posttrain/recipe-tiny.yaml --dry-run",
    "dpo": "crucible dpo apo.yaml dpo.init_from=runs/sft dpo.beta=0.1",
    "grpo": "crucible grpo rl.yaml grpo.init_from=runs/sft --resume",
    "distill": "crucible distill gkd.yaml distill.init_from=runs/student",
    "pref-data": "crucible pref-data pairs.jsonl --chosen-from runs/big --rejected-from runs/small",
    "completion": "crucible completion bash > ~/.local/share/bash-completion/completions/crucible",
}


def subcommands(parser: argparse.ArgumentParser, prefix: str = ""):
    """(command path, parser) of every command and subcommand, depth first."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                path = f"{prefix}{name}"
                yield path, sub
                yield from subcommands(sub, path + " ")


def _add_examples(parser: argparse.ArgumentParser) -> None:
    for path, sub in subcommands(parser):
        example = EXAMPLES.get(path)
        if example and "Example" not in (sub.epilog or ""):
            sub.epilog = (sub.epilog + "\n\n" if sub.epilog else "") + f"Example: {example}"


# Old command names, kept for one release: (old argv prefix, new argv prefix).
DEPRECATED = {
    "hardware": ["plan", "hardware"],
    "roofline": ["plan", "roofline"],
    "compass": ["plan", "compass"],
    "scaling": ["plan", "scaling"],
}


def rewrite_argv(argv: list[str]) -> list[str]:
    """`eval compare|audit ...` -> the `eval-compare|eval-audit` parsers; deprecated names:
    `crucible hardware ...` -> `crucible plan hardware ...` (and `plan CONFIG` -> `plan model
    CONFIG`) with a note on stderr. Other command lines are returned as they are."""
    from crucible.plan.commands import PLAN_COMMANDS

    if len(argv) > 1 and argv[0] == "eval" and argv[1] in ("compare", "audit", "longctx"):
        return [f"eval-{argv[1]}", *argv[2:]]
    new = None
    if argv and argv[0] in DEPRECATED:
        new = [*DEPRECATED[argv[0]], *argv[1:]]
    elif len(argv) > 1 and argv[0] == "plan" and argv[1] not in (*PLAN_COMMANDS, "-h", "--help"):
        new = ["plan", "model", *argv[1:]]
    if new is None:
        return argv
    old_name = " ".join(argv[:1] if argv[0] != "plan" else ["plan", "CONFIG"])
    new_name = " ".join(new[:2])
    print(
        f"crucible: note: `crucible {old_name}` is deprecated and will be removed in the next "
        f"release; use `crucible {new_name}`",
        file=sys.stderr,
    )
    return new


_USER_OS_ERRORS = {
    errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EISDIR, errno.ENOSPC,
    errno.EEXIST, errno.EDQUOT,
}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    """Exit codes: 0 done; 2 a user error (one line); 1 an internal error (traceback);
    75 stopped by SIGTERM/SIGINT after a checkpoint; 3 diverged (the guards gave up)."""
    from crucible.train.distributed import launched_by_torchrun
    from crucible.train.errors import TrainingStopped

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = rewrite_argv(list(sys.argv[1:] if argv is None else argv))
    args = build_parser().parse_args(argv)
    name = getattr(args, "command_name", args.command)
    try:
        code = args.func(args)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        # One clear line (or a short block for config validation), no traceback.
        if os.environ.get("CRUCIBLE_DEBUG"):
            raise
        print(f"crucible {name}: error: {e}", file=sys.stderr)
        code = 2
    except OSError as e:
        if e.errno not in _USER_OS_ERRORS or os.environ.get("CRUCIBLE_DEBUG"):
            raise
        # The environment refused a read or write (read-only mount, no permission, disk full).
        where = f"{e.filename}: " if e.filename else ""
        print(f"crucible {name}: error: {where}{e.strerror}", file=sys.stderr)
        code = 2
    except TrainingStopped as e:
        print(f"crucible {name}: {e}", file=sys.stderr)
        code = e.exit_code
    except KeyboardInterrupt:
        code = 130
    except Exception:  # noqa: BLE001 - a bug: show where, exit 1
        rank = os.environ.get("RANK")
        print(f"crucible {name}: internal error" + (f" on rank {rank}" if rank else ""),
              file=sys.stderr)  # fmt: skip
        traceback.print_exc()
        code = 1
    if launched_by_torchrun() and code:
        # Leave at once: torchrun sees the failure and stops the other ranks within seconds,
        # instead of them waiting in a collective for the timeout.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
