"""`crucible merge CONFIG`: merge Crucible checkpoints and Hugging Face models (mergekit-style YAML).

crucible merge merge.yaml --out runs/merged [--hf] [--overwrite]
crucible merge merge.yaml --out runs/merged --search weight=0:1:0.1 --task arithmetic --limit 200
"""

from __future__ import annotations

import argparse
from pathlib import Path

from crucible.argtypes import positive_int

MERGE_HELP = (
    "merge models (linear, model_soup, slerp, task_arithmetic, ties, dare_linear, dare_ties) "
    "from a mergekit-style YAML into a run directory, optionally searching a weight on an eval"
)


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `merge` command to crucible's argument parser."""
    p = subparsers.add_parser("merge", help=MERGE_HELP, description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("config", metavar="CONFIG", help="merge YAML (see docs/post-training.md)")
    p.add_argument("--out", default=None, help="output run directory (default runs/<name>)")
    p.add_argument("--hf", action="store_true", help="also write a transformers export to OUT/hf")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    p.add_argument(
        "--search",
        default=None,
        metavar="NAME=GRID",
        help="grid one parameter of the last merge, e.g. weight=0:1:0.1 (also t, lambda, "
        "density); the best point is written to OUT",
    )
    p.add_argument("--task", default=None, help="eval task scoring each --search point")
    p.add_argument(
        "--limit", type=positive_int, default=None, help="documents of the task per point"
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0, help="seed of the task subset")
    p.set_defaults(func=run_command)
    return p


def run_command(args: argparse.Namespace) -> int:
    from crucible.config import ConfigError
    from crucible.posttrain.merge_config import load_specs
    from crucible.posttrain.merge_io import check_output, dump_specs, write_run
    from crucible.posttrain.merge_run import run_merges
    from crucible.posttrain.merge_search import apply_value, parse_grid, search

    config = Path(args.config)
    specs = load_specs(config)
    out = Path(args.out) if args.out else Path("runs") / (specs[-1].name or config.stem)
    check_output(out, args.overwrite)
    if (args.search is None) != (args.task is None):
        raise ConfigError("--search and --task go together (a grid, and the task that scores it)")
    if args.search:
        param, grid = parse_grid(args.search)
        table = search(specs, param, grid, args.task, out.with_name(out.name + "-search"),
                       limit=args.limit, device=args.device, seed=args.seed,
                       config_dir=config.parent)  # fmt: skip
        best = table["best"][param]
        specs = [*specs[:-1], apply_value(specs[-1], param, best)]
        print(f"best {param}={best:g}: {table['metric']} {table['best'][table['metric']]:.4f} "
              f"(table and plot in {out.name}-search/)")  # fmt: skip
    state, template, recipe = run_merges(specs, config.parent)
    docs = [s.model_dump(mode="json", by_alias=True, exclude_none=True) for s in specs]
    write_run(out, state, template, dump_specs(docs), recipe, hf=args.hf)
    print(f"merged -> {out} (crucible eval {out}; crucible generate {out} ...)")
    return 0
