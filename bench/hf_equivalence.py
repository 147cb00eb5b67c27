"""Our logits vs transformers' on the HF export of the same random weights, fp32 and bf16.

python bench/hf_equivalence.py --preset llama3.2-1b-ablation    # on a GPU
python bench/hf_equivalence.py --preset tiny                    # CPU
"""

from __future__ import annotations

import argparse
import json
import tempfile

import torch

from crucible.config import load_config
from crucible.model import Transformer, export_hf


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", default="llama3.2-1b-ablation")
    ap.add_argument("--overrides", nargs="*", default=[])
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = load_config(args.preset, args.overrides).model
    torch.manual_seed(0)
    ours = Transformer(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, min(args.seq, cfg.max_seq_len)))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        export_hf(ours, tmp)
        theirs = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
    ours, theirs, ids = ours.to(device), theirs.to(device), ids.to(device)
    print(f"# {args.preset} ({type(theirs).__name__}), {device}, torch {torch.__version__}")
    print("| dtype | max abs diff | relative L2 diff | reference |")
    print("|---|---|---|---|")
    with torch.no_grad():
        ref = ours(ids).logits.double()
        for label, dt in (("fp32", None), ("bf16 autocast", torch.bfloat16)):
            ctx = (
                torch.autocast(device.type, dtype=dt)
                if dt
                else torch.autocast(device.type, enabled=False)
            )
            with ctx:
                a = ours(ids).logits.double()
                b = theirs(ids).logits.double()
            diff = (a - b).abs().max().item()
            rel = ((a - b).norm() / b.norm()).item()
            rel_ref = ((a - ref).norm() / ref.norm()).item()
            print(f"| {label} | {diff:.3e} | {rel:.3e} | ours vs fp32 ours: {rel_ref:.2e} |")
            rows.append(dict(dtype=label, max_abs=diff, rel_l2=rel, rel_vs_fp32=rel_ref))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": str(device), "preset": args.preset, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
