"""Cloze (CF) scoring throughput vs the bare forward passes of the same batches.

    .venv/bin/python bench/eval_overhead.py [--docs 64] [--batch-size 32] [--threads N]

For the `tiny` preset (random weights: speed does not depend on them) run by our Transformer and by
transformers (its HF export), this scores `stdlib_next_line` documents and reports examples/s, then
times the model alone on exactly the batches the scorer built. overhead = scoring / bare forward
(target <= 1.2x): tokenisation, padding, log-softmax and bookkeeping are the difference.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


def _tokenizer(vocab_size: int, out: Path) -> Path:
    from crucible.data.corpora import iter_stdlib_documents
    from crucible.tokenizer.train import train_tokenizer

    texts = [d.text for d in iter_stdlib_documents("train", max_bytes=2_000_000)]
    return train_tokenizer(texts, vocab_size, out)


def _measure(lm, requests, n_docs: int, batch_size: int, repeats: int) -> dict[str, float]:
    from crucible.evaluate.scoring import loglikelihood

    captured: list[torch.Tensor] = []
    inner = lm.logits

    def recording(ids):
        captured.append(ids.clone())
        return inner(ids)

    lm.logits = recording
    loglikelihood(lm, requests, batch_size, share_context=False)  # warm-up + the batches
    lm.logits = inner
    score_s = bare_s = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        loglikelihood(lm, requests, batch_size, share_context=False)
        score_s = min(score_s, time.perf_counter() - t0)
        t0 = time.perf_counter()
        with torch.no_grad():
            for ids in captured:
                inner(ids)
        bare_s = min(bare_s, time.perf_counter() - t0)
    shared_s = float("inf")
    if lm.can_fork:
        for _ in range(repeats):
            t0 = time.perf_counter()
            loglikelihood(lm, requests, batch_size, share_context=True)
            shared_s = min(shared_s, time.perf_counter() - t0)
    return {
        "examples_per_s": n_docs / score_s,
        "bare_forward_examples_per_s": n_docs / bare_s,
        "overhead": score_s / bare_s,
        "shared_context_examples_per_s": n_docs / shared_s if lm.can_fork else float("nan"),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--docs", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM

    from crucible.config import load_config
    from crucible.evaluate.builtin import build_builtin
    from crucible.evaluate.lm import HFLM, CrucibleLM, TextTokenizer
    from crucible.evaluate.task import mc_requests
    from crucible.model import Transformer, export_hf
    from crucible.tokenizer.train import load_tokenizer

    cfg = load_config("tiny").model
    with tempfile.TemporaryDirectory() as tmp:
        tok_path = _tokenizer(cfg.vocab_size, Path(tmp) / "tokenizer.json")
        tok = TextTokenizer.from_tokenizers(load_tokenizer(tok_path))
        torch.manual_seed(0)
        model = Transformer(cfg).eval()
        hf_dir = export_hf(model, Path(tmp) / "hf", tokenizer_path=tok_path)
        hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
        task = build_builtin("stdlib_next_line", args.docs)
        requests = [r for d in task.docs for r in mc_requests(d, "cf")[0]]
        print(
            f"tiny preset ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params), "
            f"{len(task.docs)} docs x 4 choices, batch {args.batch_size}, "
            f"{torch.get_num_threads()} threads"
        )
        rows = {}
        for name, lm in (
            ("crucible", CrucibleLM(model, tok, cfg)),
            ("transformers", HFLM(hf, tok)),
        ):
            r = rows[name] = _measure(lm, requests, len(task.docs), args.batch_size, args.repeats)
            print(
                f"{name:<13} {r['examples_per_s']:8.1f} examples/s  bare forward "
                f"{r['bare_forward_examples_per_s']:8.1f}/s  overhead {r['overhead']:.2f}x  "
                f"shared-context {r['shared_context_examples_per_s']:8.1f}/s"
            )
    if args.json:
        import json
        import platform

        meta = {"command": "bench/eval_overhead.py", "args": vars(args), "torch": torch.__version__,
                "threads": torch.get_num_threads(), "machine": platform.machine()}  # fmt: skip
        Path(args.json).write_text(json.dumps({**meta, "rows": rows}, indent=1, default=str))


if __name__ == "__main__":
    main()
