"""Tokenization throughput: the shard pipeline vs a plain `tokenizers` encode_batch loop.

Same text, same tokenizer, same process. The pipeline time includes everything `data tokenize`
does per document (encode, append EOS, convert to uint16, write .ds/.ds.index); the baseline only
encodes. Each is run `--repeats` times, alternating, and the best time is kept.

    .venv/bin/python bench/tokenize_throughput.py --mb 8 --workers 1 2
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from tokenizers import Tokenizer

from crucible.data.corpora import iter_stdlib_documents
from crucible.data.shards import write_shards
from crucible.tokenizer.train import train_tokenizer


def baseline(tok: Tokenizer, texts: list[str], batch_size: int, fast: bool) -> float:
    start = time.perf_counter()
    encode = tok.encode_batch_fast if fast else tok.encode_batch
    for i in range(0, len(texts), batch_size):
        encode(texts[i : i + batch_size], add_special_tokens=False)
    return time.perf_counter() - start


def pipeline(tok_path: Path, texts: list[str], batch_size: int, workers: int) -> float:
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        write_shards(
            texts, tok_path, out, num_workers=workers, batch_size=batch_size, show_progress=False
        )
        return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--mb", type=float, default=8.0, help="MB of stdlib text to tokenize")
    ap.add_argument("--tokenizer", help="tokenizer.json (default: train a 8192-token BPE)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1], help="pipeline processes")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    texts = [d.text for d in iter_stdlib_documents("train", int(args.mb * 1e6))]
    mb = sum(len(t.encode()) for t in texts) / 1e6
    with tempfile.TemporaryDirectory() as tmp:
        tok_path = Path(args.tokenizer or train_tokenizer(texts, 8192, tmp))
        tok = Tokenizer.from_file(str(tok_path))
        print(f"{len(texts)} documents, {mb:.1f} MB, {os.cpu_count()} CPUs, tokenizer {tok_path}")
        print(f"TOKENIZERS_PARALLELISM={os.environ.get('TOKENIZERS_PARALLELISM', '(unset)')}")
        best: dict[str, float] = {}
        for _ in range(args.repeats):
            runs = {
                "encode_batch": lambda: baseline(tok, texts, args.batch_size, fast=False),
                "encode_batch_fast": lambda: baseline(tok, texts, args.batch_size, fast=True),
            }
            for w in args.workers:
                runs[f"pipeline workers={w}"] = lambda w=w: pipeline(
                    tok_path, texts, args.batch_size, w
                )
            for name, fn in runs.items():
                best[name] = min(best.get(name, float("inf")), fn())
    base = best["encode_batch"]
    for name, seconds in best.items():
        print(f"{name:<24} {mb / seconds:8.2f} MB/s   {base / seconds:5.2f}x encode_batch")


if __name__ == "__main__":
    main()
