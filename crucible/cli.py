"""`crucible <command>`: parse arguments, call one function per command, print clear errors."""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

from crucible.config import ConfigError, dump_config, load_config, preset_names

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
        )
        print(args.prompt + text)
        if i < args.num_samples - 1:
            print("-" * 40)
    print(f"(from {ckpt})", file=sys.stderr)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from crucible.model import export_hf
    from crucible.runs import load_run_model

    run_dir = Path(args.run_dir)
    model, _, ckpt = load_run_model(run_dir, args.checkpoint)
    out = Path(args.out) if args.out else run_dir / "hf"
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
    print(f"{cfg.name}: {p.total:,} parameters")
    for name, n in p.as_dict().items():
        if name != "total":
            print(f"  {name:<10} {n:>15,}  {n / p.total:6.1%}")
    fpt = train_flops_per_token(cfg.model, cfg.train.seq_len)
    print(f"training FLOPs per token at seq {cfg.train.seq_len}: {fpt:.4g} (6N + attention)")
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    print(dump_config(load_config(args.config, args.overrides)), end="")
    return 0


def _cmd_presets(args: argparse.Namespace) -> int:
    from crucible.plan.params import count_params

    for name in preset_names():
        cfg = load_config(name)
        print(f"{name:<24} {count_params(cfg.model).total / 1e6:10.2f}M params")
    return 0


def build_parser() -> argparse.ArgumentParser:
    presets = ", ".join(preset_names())
    parser = argparse.ArgumentParser(
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
        "--max-restarts", type=int, default=5, help="--supervise: restarts before giving up"
    )
    p.add_argument(
        "--backoff",
        type=float,
        default=5.0,
        help="--supervise: seconds before the first restart, doubled after each (max 300)",
    )
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser(
        "quickstart",
        help="the whole path on the embedded corpus in a few minutes (no network)",
        description="Train a tokenizer on the Python standard library, tokenize it into shards, "
        "pretrain the `tiny` preset, report validation bits-per-byte, sample text, export to "
        "the Hugging Face layout and reload it with transformers. Output: runs/quickstart/.",
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
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint", default=None, help="step_N directory (default: latest)")
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
    return parser


def main(argv: list[str] | None = None) -> None:
    """Exit codes: 0 done; 2 a user error (one line); 1 an internal error (traceback);
    75 stopped by SIGTERM/SIGINT after a checkpoint; 3 diverged (the guards gave up)."""
    from crucible.train.distributed import launched_by_torchrun
    from crucible.train.errors import TrainingStopped

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        # One clear line (or a short block for config validation), no traceback.
        if os.environ.get("CRUCIBLE_DEBUG"):
            raise
        print(f"crucible {args.command}: error: {e}", file=sys.stderr)
        code = 2
    except TrainingStopped as e:
        print(f"crucible {args.command}: {e}", file=sys.stderr)
        code = e.exit_code
    except KeyboardInterrupt:
        code = 130
    except Exception:  # noqa: BLE001 - a bug: show where, exit 1
        rank = os.environ.get("RANK")
        print(f"crucible {args.command}: internal error" + (f" on rank {rank}" if rank else ""),
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
