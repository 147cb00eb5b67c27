"""How Python-shaped are a run's samples from `def `? A table over sampling settings.

For each setting it draws N functions the way the quickstart does (`sample_functions`: cut at
the next top-level line) and counts the shape checks of crucible/evaluate/code_shape.py:
`def name(` signature, indented body, `return`, balanced brackets, parses as Python; plus how
many started with the double space a bare trailing-space token produces ("def  x").

    python bench/sample_shape.py runs/quickstart --n 60 --temperatures 0.6,0.8,1.0
    python bench/sample_shape.py runs/quickstart --top-k 50 --top-p 1   # top-k instead
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from crucible.evaluate.code_shape import PythonShape
from crucible.quickstart import SAMPLE_MAX_TOKENS, SAMPLE_TOP_P, sample_functions
from crucible.runs import load_run_model
from crucible.tokenizer.train import load_tokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--n", type=int, default=60, help="samples per setting")
    ap.add_argument("--temperatures", default="0.6,0.8,1.0")
    ap.add_argument("--max-new-tokens", default=str(SAMPLE_MAX_TOKENS), help="comma list")
    ap.add_argument("--healing", default="on,off", help="token healing settings to compare")
    ap.add_argument("--top-k", type=int, default=0, help="0: no top-k")
    ap.add_argument("--top-p", type=float, default=SAMPLE_TOP_P, help="1: no nucleus sampling")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed of every row")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, _, ckpt = load_run_model(args.run_dir)
    tok = load_tokenizer(args.run_dir / "tokenizer.json")
    print(f"# {ckpt}, {args.n} samples per row, seed {args.seed}, top-k {args.top_k or None}, "
          f"top-p {args.top_p}, torch {torch.__version__}, "
          f"{os.cpu_count()} cores")  # fmt: skip
    print("| token healing | temperature | max new tokens | signature | indented | return "
          "| balanced brackets | parses | starts 'def  ' |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for heal in args.healing.split(","):
        for budget in [int(b) for b in args.max_new_tokens.split(",")]:
            for temp in [float(t) for t in args.temperatures.split(",")]:
                samples = sample_functions(model, tok, n=args.n, seed=args.seed, temperature=temp,
                                           max_new_tokens=budget, token_healing=heal == "on",
                                           top_k=args.top_k or None,
                                           top_p=args.top_p if args.top_p < 1 else None)  # fmt: skip
                shapes = [PythonShape.of(p + t) for p, t in samples]

                def pct(field: str, shapes=shapes) -> str:
                    return f"{100 * sum(getattr(s, field) for s in shapes) / len(shapes):.0f}%"

                double = sum(t.startswith(" ") for _, t in samples) / len(samples)
                print(f"| {heal} | {temp} | {budget} | {pct('signature')} | {pct('indented')} | {pct('has_return')} | "
                      f"{pct('balanced')} | {pct('parses')} | {100 * double:.0f}% |", flush=True)  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
