"""`crucible eval ...`: evaluate checkpoints or HF models, compare results, audit tasks.

crucible eval PATH [PATH...] --tasks early,hellaswag=data/hs.jsonl [--limit N] [--out F]
crucible eval compare A.json B.json [...]     (or run directories: their latest results)
crucible eval audit RUN [RUN...] [--plot audit.png]
crucible eval longctx PATH [--tasks needle,multikey,vartrack] [--lengths 256,512,1024]
    [--depths 0,0.25,0.5,0.75,1] [--trials N] [--candidates N] [--keys words|numbers]
    [--max-seq-len N] [--rope-scaling yarn:4 [--original-len N]] [--out F] [--plot F]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from crucible.argtypes import nonneg_int, positive_int

EVAL_HELP = (
    "evaluate run directories, checkpoints or local Hugging Face models (`eval PATH --tasks`), "
    "compare results (`eval compare`), audit tasks across seeds (`eval audit RUNS`), or run "
    "long-context retrieval tasks over lengths and depths (`eval longctx PATH`)"
)


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `eval` command to crucible's argument parser."""
    p = subparsers.add_parser("eval", help=EVAL_HELP, description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument(
        "paths",
        nargs="+",
        metavar="PATH",
        help="models to evaluate: run directories, checkpoints or Hugging Face directories",
    )
    p.add_argument(
        "--tasks",
        default=None,
        help="comma-separated task names, groups (early, builtin) or NAME=FILE (default early); "
        "longctx: needle, multikey, vartrack (default all three)",
    )
    p.add_argument("--checkpoint", default=None, help="a checkpoint of the run (default latest)")
    p.add_argument(
        "--all-checkpoints",
        action="store_true",
        help="evaluate every complete checkpoint of each run",
    )
    p.add_argument(
        "--limit", type=positive_int, default=None, help="documents per task (fixed subset)"
    )
    p.add_argument("--fewshot", type=nonneg_int, default=None, help="override few-shot examples")
    p.add_argument(
        "--formulation",
        choices=["cf", "mcf"],
        default=None,
        help="override CF/MCF for multiple-choice tasks",
    )
    p.add_argument("--pmi", action="store_true", help="also compute acc_pmi (2x the cost)")
    p.add_argument(
        "--samples",
        type=positive_int,
        default=None,
        help="generations per problem for pass@k / maj@k (sampled, temperature 0.8)",
    )
    p.add_argument("--data-dir", default=None, help="directory with <task>.jsonl benchmark files")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--backend",
        choices=["auto", "transformers", "crucible"],
        default="auto",
        help="how to run a Hugging Face directory",
    )
    p.add_argument(
        "--allow-unsafe-code",
        action="store_true",
        help="run generated code (HumanEval) even where the namespace sandbox is unavailable: "
        "without isolation it can read and write your files and use the network",
    )
    p.add_argument("--out", default=None, help="results JSON (default: beside the model)")
    p.set_defaults(func=run_command)

    # `crucible eval compare` and `crucible eval audit`: their own parsers (flags, help), reached
    # through `crucible.cli.rewrite_argv` (`eval compare ...` -> `eval-compare ...`), so that
    # `crucible eval PATH` keeps evaluating. No help= keeps them out of the top-level list.
    c = subparsers.add_parser(
        "eval-compare",
        prog="crucible eval compare",
        description="Compare results side by side: one column per results file (or run "
        "directory: its latest results), one row per task and metric.",
        epilog="Example: crucible eval compare runs/a runs/b/eval/step_000300.json",
    )
    c.add_argument("results", nargs="+", metavar="RESULTS", help="results JSON files or run dirs")
    c.set_defaults(func=lambda a: _compare(a.results), command_name="eval compare")
    a = subparsers.add_parser(
        "eval-audit",
        prog="crucible eval audit",
        description="Audit tasks across seeds and checkpoints: monotonicity, signal-to-noise, "
        "distance from the random baseline, from each run's eval events and results files.",
        epilog="Example: crucible eval audit runs/seed0 runs/seed1 runs/seed2 --plot audit.png",
    )
    a.add_argument("runs", nargs="+", metavar="RUN", help="run directories")
    a.add_argument("--plot", default=None, help="where to save the score-vs-tokens plot")
    a.set_defaults(func=lambda a: _audit(a.runs, a.plot), command_name="eval audit")
    lc = subparsers.add_parser(
        "eval-longctx",
        prog="crucible eval longctx",
        description="Long-context evaluation: needle retrieval over a grid of lengths and depths "
        "(a heatmap), and the loss by position on held-out windows; optionally with RoPE "
        "scaling applied at load time.",
        epilog="Example: crucible eval longctx runs/long --lengths 256,512,1024 --plot lc.png",
    )
    lc.add_argument("paths", nargs="+", metavar="PATH", help="run directories or checkpoints")
    lc.add_argument("--tasks", default=None, help="comma-separated long-context tasks")
    lc.add_argument("--checkpoint", default=None, help="a checkpoint of the run (default latest)")
    lc.add_argument("--seed", type=int, default=0)
    lc.add_argument("--device", default="cpu")
    lc.add_argument(
        "--backend", choices=["auto", "transformers", "crucible"], default="auto",
        help="how to run a Hugging Face directory",
    )  # fmt: skip
    lc.add_argument("--out", default=None, help="results JSON (default: beside the model)")
    lc.add_argument("--plot", default=None, help="where to save the heatmap (PNG)")
    lc.add_argument("--lengths", default="256,512,1024", help="sequence lengths in tokens")
    lc.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="needle depths in [0, 1]")
    lc.add_argument(
        "--trials", type=positive_int, default=10, help="samples per (length, depth) cell"
    )
    lc.add_argument("--candidates", type=positive_int, default=10, help="answers scored per sample")
    lc.add_argument(
        "--loss-windows",
        type=nonneg_int,
        default=8,
        help="held-out windows of the longest length for loss by position (0: skip)",
    )
    lc.add_argument(
        "--keys",
        choices=["words", "numbers"],
        default="words",
        help="values to retrieve: single-token words (default) or 5-digit numbers",
    )
    lc.add_argument("--max-seq-len", type=positive_int, default=None, help="positions to allow")
    lc.add_argument(
        "--rope-scaling", default=None, metavar="TYPE:FACTOR", help="e.g. yarn:4, dynamic:2"
    )
    lc.add_argument(
        "--original-len",
        type=positive_int,
        default=None,
        help="length the scaling starts from (default: the model's max_seq_len)",
    )
    lc.set_defaults(func=lambda a: _longctx(a.paths, a), command_name="eval longctx")
    return p


def run_command(args: argparse.Namespace) -> int:
    return _evaluate(args)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if args.fewshot is not None:
        out["num_fewshot"] = args.fewshot
    if args.formulation is not None:
        out["formulation"] = args.formulation
    if args.pmi:
        out["pmi"] = True
    if args.samples:
        out.update(samples=args.samples, temperature=0.8)
    if args.allow_unsafe_code:
        out["allow_unsafe_code"] = True
    return out


def _targets(args: argparse.Namespace) -> list[tuple[str, str | None]]:
    """(path, checkpoint) pairs to evaluate."""
    from crucible.train.checkpoint import list_checkpoints

    out: list[tuple[str, str | None]] = []
    for path in args.paths:
        ckpts = Path(path) / "checkpoints"
        if args.all_checkpoints and ckpts.is_dir():
            out.extend((path, str(p)) for _, p in list_checkpoints(ckpts))
        else:
            out.append((path, args.checkpoint))
    return out


def _evaluate(args: argparse.Namespace) -> int:
    from crucible.evaluate.load import load_eval_model
    from crucible.evaluate.results import default_results_path, format_table, write_results
    from crucible.evaluate.suite import evaluate_tasks

    _check_tasks(args)
    targets = _targets(args)
    if args.out and len(targets) > 1:
        raise ValueError("--out names one file; drop it to write one results file per checkpoint")
    any_error = False
    for path, ckpt in targets:
        lm, info = load_eval_model(path, ckpt, args.device, args.backend)
        tasks = evaluate_tasks(
            lm, [args.tasks or "early"], limit=args.limit, seed=args.seed, data_dir=args.data_dir,
            batch_size=args.batch_size, overrides=_overrides(args),
        )  # fmt: skip
        result = {
            **info,
            "config": {"tasks": args.tasks or "early", "limit": args.limit, "seed": args.seed,
                       "batch_size": args.batch_size, **_overrides(args)},
            "tasks": tasks,
        }  # fmt: skip
        out = write_results(result, args.out or default_results_path(info))
        print(f"{lm.name}: {out}")
        print(format_table(result))
        any_error |= any("error" in t for t in tasks.values())
    return 1 if any_error else 0


def _check_tasks(args: argparse.Namespace) -> None:
    """Before any model is loaded: every task name is known, and a NAME=FILE task's file reads
    and yields records (a file whose records all lack the benchmark's fields is an error; some
    invalid records are a warning)."""
    import sys

    from crucible.config import ConfigError
    from crucible.evaluate.benchmarks import BENCHMARKS, build_benchmark, read_records
    from crucible.evaluate.suite import GROUPS, expand, task_names

    for spec in expand([args.tasks or "early"]):
        name, _, source = spec.partition("=")
        if name not in task_names():
            import difflib

            close = difflib.get_close_matches(name, [*task_names(), *GROUPS], n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(
                f"--tasks: unknown task {name!r}{hint}; known: {', '.join(task_names())}; "
                f"groups: {', '.join(GROUPS)}"
            )
        if source and name in BENCHMARKS:
            task = build_benchmark(name, read_records(source))
            if not task.docs:
                why = f" ({task.invalid_examples[0]})" if task.invalid_examples else ""
                raise ConfigError(f"--tasks {name}={source}: no usable {name} records{why}")
            if task.invalid:
                print(
                    f"crucible eval: warning: {source}: {task.invalid} of "
                    f"{task.invalid + len(task.docs)} records skipped ({task.invalid_examples[0]})",
                    file=sys.stderr,
                )


def _results_file(path: str) -> Path:
    p = Path(path)
    if p.is_dir():
        found = sorted((p / "eval").glob("*.json")) or sorted(p.glob("eval_results.json"))
        if not found:
            raise FileNotFoundError(f"{p}: no results (run `crucible eval {p}` first)")
        return found[-1]
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such results file")
    return p


def _compare(paths: list[str]) -> int:
    from crucible.evaluate.results import compare_table

    if len(paths) < 2:
        raise ValueError("eval compare needs two or more results files or run directories")
    results = []
    for p in paths:
        f = _results_file(p)
        try:
            results.append(json.loads(f.read_text()))
        except json.JSONDecodeError as e:
            raise ValueError(f"{f}:{e.lineno}: not a results JSON ({e.msg})") from None
    print(compare_table(results))
    return 0


def _audit(runs: list[str], plot: str | None) -> int:
    from crucible.evaluate.audit import audit, format_audit, plot_audit

    if not runs:
        raise ValueError("eval audit needs run directories")
    dirs = [Path(r) for r in runs]
    for d in dirs:
        if not d.is_dir():
            raise FileNotFoundError(f"{d}: no such run directory")
    stats = audit(dirs)
    print(format_audit(stats))
    out = Path(plot) if plot else dirs[0].parent / "eval_audit.png"
    print(f"plot: {plot_audit(dirs, out)}")
    return 0


def _numbers(flag: str, text: str, kind: type) -> list:
    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{flag}: expected comma-separated numbers, got {text!r}") from None


def _longctx(paths: list[str], args: argparse.Namespace) -> int:
    from crucible.evaluate.load import load_eval_model
    from crucible.evaluate.longctx import (
        LONGCTX_TASKS,
        check_grid,
        evaluate_longctx,
        extend_context,
        format_longctx,
        format_position_loss,
        loss_by_position,
        parse_rope_scaling,
        plot_longctx,
    )
    from crucible.evaluate.results import default_results_path, write_results

    if len(paths) != 1:
        raise ValueError("eval longctx takes one run directory, checkpoint or HF directory")
    tasks = args.tasks.split(",") if args.tasks else list(LONGCTX_TASKS)
    lengths = _numbers("--lengths", args.lengths, int)
    depths = _numbers("--depths", args.depths, float)
    if args.rope_scaling:
        parse_rope_scaling(args.rope_scaling)  # a malformed flag fails before loading anything
    lm, info = load_eval_model(paths[0], args.checkpoint, args.device, args.backend)
    lm = extend_context(lm, args.max_seq_len, args.rope_scaling, args.original_len)
    check_grid(lm, tasks, lengths, depths, args.candidates)
    results = evaluate_longctx(
        lm, tasks, lengths, depths, args.trials, args.candidates, args.seed, keys=args.keys
    )
    position_loss = None
    if args.loss_windows > 0:
        position_loss = loss_by_position(lm, max(lengths), args.loss_windows, args.seed)
    tag = f"longctx-{args.rope_scaling.replace(':', 'x')}" if args.rope_scaling else "longctx"
    base = default_results_path(info)
    out = Path(args.out) if args.out else base.with_name(f"{base.stem}.{tag}.json")
    config = {"lengths": lengths, "depths": depths, "trials": args.trials,
              "candidates": args.candidates, "keys": args.keys, "seed": args.seed, "max_seq_len": lm.max_len,
              "rope_scaling": args.rope_scaling, "original_len": args.original_len}  # fmt: skip
    extra = {"position_loss": position_loss} if position_loss else {}
    write_results({**info, "config": config, "longctx": results, **extra}, out)
    title = f"{lm.name}" + (f" ({args.rope_scaling})" if args.rope_scaling else "")
    plot = plot_longctx(results, Path(args.plot) if args.plot else out.with_suffix(".png"), title)
    print(format_longctx(results))
    if position_loss:
        print(format_position_loss(position_loss))
    print(f"results: {out}\nheatmap: {plot}")
    return 0
