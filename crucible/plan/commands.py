"""Command-line entry points of the planner: `register(subparsers)` adds the `plan` group to the
`crucible` parser: `plan model`, `plan hardware`, `plan roofline`, `plan compass` and
`plan scaling fit`. The old top-level names (`crucible plan hardware` ..., and `crucible plan model CONFIG`)
are rewritten to these by `crucible.cli.main` for one release, with a deprecation note.

Each handler returns an exit code; errors are ValueError subclasses with a message meant for the
user (the CLI prints them without a traceback).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path

from crucible.argtypes import (
    JSON_HELP,
    fraction,
    nonneg_float,
    nonneg_int,
    positive_float,
    positive_int,
    write_json_arg,
)
from crucible.plan.budget import DEFAULT_MFU

CONFIG_HELP = "a YAML config file or a shipped preset name (see `crucible presets`)"
OVERRIDES_HELP = "dotted overrides, e.g. model.num_layers=24 train.seq_len=8192"


def _accelerator(args: argparse.Namespace):
    from crucible.plan.hardware import custom_accelerator, find_accelerator

    if args.peak_tflops and args.memory_gib:
        return custom_accelerator(args.gpu, args.peak_tflops, args.memory_gib)
    return find_accelerator(args.gpu)


def _moe(args: argparse.Namespace, cfg):
    """A MoEConfig from the --experts flags (None without them: the config's own model.moe)."""
    from pydantic import ValidationError

    from crucible.config import ConfigError, MoEConfig

    if not args.experts:
        return None
    try:
        return MoEConfig(
            num_experts=args.experts,
            top_k=args.top_k,
            expert_intermediate_size=args.expert_intermediate or cfg.model.intermediate_size,
            shared_experts=args.shared_experts,
        )
    except ValidationError as e:
        msg = "; ".join(err["msg"].removeprefix("Value error, ") for err in e.errors())
        raise ConfigError(f"--experts/--top-k/--shared-experts: {msg}") from None


def _cmd_plan(args: argparse.Namespace) -> int:
    from crucible.config import load_config
    from crucible.plan.memory import Layout
    from crucible.plan.report import PlanRequest, plan_markdown

    if args.budget_cost and args.price is None:
        raise ValueError("--budget-cost needs --price (the price per GPU-hour)")
    cfg = load_config(args.config, args.overrides)
    trainer = bool(args.write_config or args.trainer_only)
    seq = args.seq_len or cfg.train.seq_len
    mbs = args.micro_batch or cfg.train.micro_batch_size
    gpus = args.gpus
    dp = args.dp or (gpus // (args.tp * args.pp * args.cp) if gpus else 1)
    layout = Layout(dp, args.tp, args.pp, args.cp, args.zero, mbs, seq, 1, args.recompute,
                    recompute_every=args.recompute_every)  # fmt: skip
    if gpus and layout.world_size != gpus:
        raise ValueError(
            f"layout DP={dp} x TP={args.tp} x PP={args.pp} x CP={args.cp} = "
            f"{layout.world_size} GPUs, but --gpus is {gpus}"
        )
    per_step = dp * mbs
    accum = max(1, cfg.train.global_batch_size // per_step)
    layout = Layout(dp, args.tp, args.pp, args.cp, args.zero, mbs, seq, accum, args.recompute,
                    recompute_every=args.recompute_every)  # fmt: skip
    req = PlanRequest(
        accelerator=_accelerator(args),
        layout=layout,
        gpus=gpus,
        days=args.days,
        tokens=args.tokens,
        mfu=args.mfu,
        price_per_gpu_hour=args.price,
        peak_tflops=args.peak_tflops,
        budget_gpu_hours=args.budget_gpu_hours,
        budget_cost=args.budget_cost,
        precision=args.precision or ("autocast" if trainer else "mixed"),
        moe=_moe(args, cfg),
        search=args.search,
        top=args.top,
        flops=args.flops,
        params=args.params,
        trainer_only=args.trainer_only,
    )
    print(plan_markdown(cfg, req), end="")
    if args.write_config:
        _write_config(cfg, req, Path(args.write_config))
    return 0


def _write_config(cfg, req, path: Path) -> None:
    """The chosen layout (the best one the trainer runs with --search, else the flags') as a
    training config, written to a temporary file and renamed into place."""
    from crucible.config import dump_config
    from crucible.plan.search import Cluster, search_layouts
    from crucible.plan.trainer_layouts import as_trainer_runs, config_for

    if req.search:
        world = req.gpus or req.layout.world_size
        cands = search_layouts(
            cfg.model, Cluster(req.accelerator, world), cfg.train.global_batch_size,
            req.layout.seq_len, precision=req.precision, moe=req.moe, trainer_only=True,
        )  # fmt: skip
        layout = cands[0].layout
    else:
        layout = as_trainer_runs(req.layout)
    out = config_for(cfg, layout)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(dump_config(out))
    tmp.replace(path)
    world, per_node = layout.world_size, 8
    if world == 1:
        launch = f"crucible train {path}"
    elif world <= per_node:
        launch = f"torchrun --standalone --nproc_per_node {world} -m crucible train {path}"
    else:  # one torchrun per node, all meeting at one rendezvous endpoint
        launch = (
            f"torchrun --nnodes {-(-world // per_node)} --nproc_per_node {per_node} "
            f"--rdzv_backend c10d --rdzv_endpoint HOST:29500 -m crucible train {path} (on each node)"
        )
    print(f"\nwrote {path} ({layout.describe()}); run it with: {launch}", file=sys.stderr)


def _cmd_hardware(args: argparse.Namespace) -> int:
    from crucible.plan.hardware import ACCELERATORS, find_accelerator

    accs = [find_accelerator(args.name)] if args.name else list(ACCELERATORS)
    if args.json:
        write_json_arg(args.json, [asdict(a) for a in accs])
        if args.json == "-":
            return 0
    print("Dense peaks (TFLOP/s; 2:4 sparse figures are twice these and never used for MFU)\n")
    print("| accelerator | bf16 | fp8 | tf32 | fp32 | memory GiB | HBM GB/s | ridge bf16 | link |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for a in accs:
        t = a.dense_tflops
        cell = [f"{t[k]:g}" if k in t else "-" for k in ("bf16", "fp8", "tf32", "fp32")]
        link = f"{a.interconnect} {a.interconnect_gbs:g} GB/s, " if a.interconnect_gbs else ""
        print(
            f"| {a.name} | {' | '.join(cell)} | {a.memory_gib:g} | {a.memory_bw_gbs:g} | "
            f"{a.ridge_point():.0f} | {link}{a.host_link} |"
        )
    return 0


def _cmd_roofline(args: argparse.Namespace) -> int:
    from crucible.config import load_config
    from crucible.plan import roofline as rl
    from crucible.plan.hardware import find_accelerator

    acc = find_accelerator(args.gpu)
    cfg = load_config(args.config, args.overrides)
    m, t = cfg.model, (args.micro_batch or cfg.train.micro_batch_size) * cfg.train.seq_len
    q, kv = m.num_heads * m.dim_per_head, m.num_kv_heads * m.dim_per_head
    ops = [
        rl.gemm(t, q + 2 * kv, m.hidden_size),
        rl.gemm(t, m.hidden_size, q),
        rl.gemm(t, 2 * m.intermediate_size, m.hidden_size),
        rl.gemm(t, m.hidden_size, m.intermediate_size),
        rl.gemm(t, m.vocab_size, m.hidden_size),
        rl.attention(t // cfg.train.seq_len, m.num_heads, cfg.train.seq_len, m.dim_per_head),
        rl.rmsnorm(t, m.hidden_size),
        rl.elementwise(t * m.intermediate_size, 4, 2),
        rl.decode_gemv(m.hidden_size, m.intermediate_size, batch=args.decode_batch),
    ]
    print(f"Roofline on {acc.name}, {args.dtype}: ridge {acc.ridge_point(args.dtype):.0f} FLOP/B")
    print("\n| operation | FLOP/byte | attainable TFLOP/s | bound | time us |")
    print("|---|---:|---:|---|---:|")
    for op in ops:
        r = rl.roofline(op, acc, args.dtype, args.peak_tflops)
        print(
            f"| {op.name} | {op.intensity:,.1f} | {r.attainable_flops / 1e12:,.1f} | {r.bound} | "
            f"{r.seconds * 1e6:,.1f} |"
        )
    return 0


def _cmd_compass(args: argparse.Namespace) -> int:
    from crucible.plan.compass import ask, decide, load_brief

    brief = load_brief(Path(args.brief)) if args.brief else ask()
    text = decide(brief)
    if args.out:
        out = Path(args.out)
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(text)
        tmp.replace(out)
        print(f"decision record written to {args.out}", file=sys.stderr)
    else:
        print(text, end="")
    return 0


def _cmd_scaling_fit(args: argparse.Namespace) -> int:
    from crucible.plan.scaling_runs import fit_runs_report

    print(fit_runs_report([Path(r) for r in args.runs], plot=args.plot), end="")
    return 0


def _plan_parser(sub) -> None:
    p = sub.add_parser(
        "model",
        help="parameters, FLOPs, memory per GPU, GPU-days and cost, parallel layouts",
        description="Plan a run from its config: exact parameters by component (MoE: total and "
        "active), FLOPs per token (6N + attention), KV cache, memory per GPU for a parallel "
        "layout (ZeRO-0..3, TP, PP, CP, recomputation) with the peak at the second step, GPUs x "
        "days x cost for the token budget at a stated MFU against the card's dense peak, the "
        "tokens a budget buys, compute-optimal size and tokens, and (--search) the ranked "
        "layouts that fit and reach the config's global batch.",
        epilog="Example: crucible plan model smollm3-3b --gpu h100 --gpus 384 --search",
    )
    p.add_argument("config", help=CONFIG_HELP)
    p.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    g = p.add_argument_group("hardware and budget")
    g.add_argument(
        "--gpu", default="H100 SXM", help="accelerator (`crucible plan hardware` lists them)"
    )
    g.add_argument(
        "--gpus", type=positive_int, default=None, help="GPU count (default: the layout's)"
    )
    g.add_argument(
        "--days", type=positive_float, default=None, help="solve for the GPU count instead"
    )
    g.add_argument(
        "--tokens", type=positive_float, default=None, help="default: steps x tokens per step"
    )
    g.add_argument(
        "--mfu",
        type=fraction,
        default=DEFAULT_MFU,
        help=f"model FLOPs utilisation against the dense peak ({DEFAULT_MFU}; docs/planning.md "
        "compares it with published runs)",
    )
    g.add_argument(
        "--flops",
        choices=("6N+attention", "6N"),
        default="6N+attention",
        help="FLOPs per token: 6N plus causal attention (default), or 6N alone (the playbook's "
        "and Chinchilla's count)",
    )
    g.add_argument(
        "--params",
        type=positive_float,
        default=None,
        help="N of 6N, e.g. 3e9, instead of the config's matmul parameter count",
    )
    g.add_argument(
        "--price", type=nonneg_float, default=None, help="price per GPU-hour, for the cost"
    )
    g.add_argument(
        "--peak-tflops",
        type=positive_float,
        default=None,
        help="MFU denominator instead of the table's dense bf16 peak (with --memory-gib: a "
        "card the table lacks)",
    )
    g.add_argument(
        "--memory-gib", type=positive_float, default=None, help="memory of an unlisted card"
    )
    g.add_argument(
        "--budget-gpu-hours", type=positive_float, default=None, help="tokens for this budget"
    )
    g.add_argument(
        "--budget-cost", type=positive_float, default=None, help="...or this cost (--price)"
    )
    g = p.add_argument_group("layout")
    g.add_argument(
        "--dp", type=positive_int, default=None, help="data parallel (default: GPUs / others)"
    )
    g.add_argument("--tp", type=positive_int, default=1, help="tensor parallel")
    g.add_argument("--pp", type=positive_int, default=1, help="pipeline parallel")
    g.add_argument("--cp", type=positive_int, default=1, help="context parallel")
    g.add_argument("--zero", type=int, default=0, choices=(0, 1, 2, 3), help="ZeRO stage")
    g.add_argument("--micro-batch", type=positive_int, default=None, help="default: the config's")
    g.add_argument("--seq-len", type=positive_int, default=None, help="default: the config's")
    g.add_argument("--recompute", default="none", choices=("none", "selective", "full"))
    g.add_argument(
        "--recompute-every",
        type=positive_int,
        default=1,
        metavar="N",
        help="recompute every N-th block",
    )
    g.add_argument(
        "--precision",
        default=None,
        choices=("mixed", "autocast"),
        help="mixed: bf16 weights + fp32 master/grads (nanotron, 18 B/param); autocast: fp32 "
        "weights under bf16 autocast (crucible's trainer, 16 B/param + bf16 copies). Default: "
        "autocast with --write-config or --trainer-only, else mixed",
    )
    g.add_argument("--search", action="store_true", help="rank every layout that fits")
    g.add_argument(
        "--trainer-only",
        action="store_true",
        help="with --search: rank only layouts `crucible train` runs (others are marked)",
    )
    g.add_argument(
        "--write-config",
        default=None,
        metavar="PATH",
        help="write the chosen layout (with --search: the best one the trainer runs) as a "
        "training config for `crucible train`",
    )
    g.add_argument("--top", type=positive_int, default=5, help="layouts to show with --search")
    g = p.add_argument_group("mixture of experts (replaces every MLP; default: model.moe)")
    g.add_argument("--experts", type=nonneg_int, default=0, help="number of routed experts")
    g.add_argument("--top-k", type=positive_int, default=2, help="experts per token")
    g.add_argument(
        "--expert-intermediate", type=positive_int, default=None, help="expert SwiGLU width"
    )
    g.add_argument("--shared-experts", type=nonneg_int, default=0, help="always-on experts")
    p.set_defaults(func=_cmd_plan)


PLAN_COMMANDS = ("model", "hardware", "roofline", "compass", "scaling")


def register(top: argparse._SubParsersAction) -> None:
    """Add the `plan` group and its commands to `crucible`'s subparsers."""
    group = top.add_parser(
        "plan",
        help="plan a run: model (params, FLOPs, memory, GPUs x days), hardware, roofline, "
        "compass, scaling",
        description="The planner. `crucible plan model CONFIG` sizes a run; the other "
        "subcommands list accelerators, place operations on a roofline, decide whether to "
        "pretrain, and fit scaling laws.",
        epilog="Example: crucible plan model smollm3-3b --gpus 384 --tokens 11e12",
    )
    subparsers = group.add_subparsers(dest="plan_command", required=True, metavar="SUBCOMMAND")
    _plan_parser(subparsers)

    p = subparsers.add_parser(
        "hardware",
        help="the accelerator table: dense peaks per dtype, memory, bandwidth, links",
        description="List the accelerators the planner and MFU display know, or one of them. "
        "Peaks are dense; sparse figures are kept apart and never used for MFU.",
    )
    p.add_argument("name", nargs="?", help="one accelerator, e.g. h100 or 'A100 80GB'")
    p.add_argument("--json", default=None, metavar="PATH", help=JSON_HELP)
    p.set_defaults(func=_cmd_hardware)

    p = subparsers.add_parser(
        "roofline",
        help="arithmetic intensity and attainable FLOP/s of a model's operations on a card",
        description="Place each operation of one training micro-batch (and one decode step) on "
        "the card's roofline: FLOP/byte, attainable TFLOP/s = min(peak, intensity x bandwidth), "
        "memory- or compute-bound.",
    )
    p.add_argument("config", help=CONFIG_HELP)
    p.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    p.add_argument("--gpu", default="H100 SXM")
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--micro-batch", type=positive_int, default=None)
    p.add_argument("--decode-batch", type=positive_int, default=1, help="sequences per decode step")
    p.add_argument(
        "--peak-tflops",
        type=positive_float,
        default=None,
        help="a measured ceiling (e.g. 720 on H100)",
    )
    p.set_defaults(func=_cmd_roofline)

    p = subparsers.add_parser(
        "compass",
        help="should you pretrain, and what: a questionnaire -> Markdown decision record",
        description="Walk why -> what -> how: can an existing model be prompted or fine-tuned "
        "(then don't pretrain)? purpose, deployment target, languages, context, compute. "
        "Interactive, or answers from a YAML brief whose keys are: existing_model_works, "
        "fine_tuning_works, purpose, target, languages, code, context_length, gpu, gpus, days, "
        "mfu, experiment_share.",
    )
    p.add_argument("--brief", default=None, help="YAML answers instead of the questionnaire")
    p.add_argument("--out", default=None, help="write the record here instead of stdout")
    p.set_defaults(func=_cmd_compass)

    p = subparsers.add_parser(
        "scaling",
        help="fit scaling laws to finished runs",
        description="Fit laws to finished run directories (summary.json + config.yaml).",
    )
    ssub = p.add_subparsers(dest="scaling_command", required=True, metavar="SUBCOMMAND")
    f = ssub.add_parser(
        "fit",
        help="L(N, D) in the Chinchilla form, and optimal LR / batch power laws",
        description="Fit L(N, D) = E + A/N^alpha + B/D^beta to the runs' final validation loss "
        "(needs >= 5 runs over several sizes and token counts), and power laws of the best "
        "learning rate and batch size against model size. Prints each fit with its error.",
    )
    f.add_argument("runs", nargs="+", help="run directories (runs/NAME)")
    f.add_argument("--plot", default=None, help="write a PNG of loss vs compute here")
    f.set_defaults(func=_cmd_scaling_fit)
