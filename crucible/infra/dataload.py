"""Data-loader throughput: tokens/s that PretrainLoader delivers from a shard directory.

The loader reads memory-mapped shards, so the first pass may come from disk and later ones from
the page cache; the figure is host-side only (no copy to a device).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from crucible.data.loader import PretrainLoader
from crucible.data.shards import ShardSet


@dataclass
class LoaderResult:
    shards: int
    corpus_tokens: int
    seq_len: int
    batch: int
    steps: int
    tokens: int
    seconds: float
    token_bytes: int  # bytes per token on disk (2 or 4)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    @property
    def mb_s(self) -> float:
        """Shard bytes read per second (each row reads seq_len + 1 tokens)."""
        return self.steps * self.batch * (self.seq_len + 1) * self.token_bytes / self.seconds / 1e6


def loader_throughput(
    shard_dir: str,
    seq_len: int = 2048,
    batch: int = 8,
    min_time_s: float = 1.0,
    max_steps: int = 1_000_000,
    eos_id: int | None = None,
) -> LoaderResult:
    """Pull steps of `batch` x `seq_len` tokens until `min_time_s` has passed."""
    shards = ShardSet(shard_dir)
    # An EOS id only shapes doc_ids; 0 keeps the timing honest for shards without dataset.json.
    eos = eos_id if eos_id is not None else (shards.eos_id if shards.eos_id is not None else 0)
    loader = PretrainLoader(shards, seq_len, batch, batch, eos_id=eos)
    loader.next_step()  # the first step builds the epoch permutation: not throughput
    tokens, steps = 0, 0
    t0 = time.perf_counter()
    while steps < max_steps and (steps == 0 or time.perf_counter() - t0 < min_time_s):
        tokens += sum(b.num_tokens for b in loader.next_step())
        steps += 1
    seconds = time.perf_counter() - t0
    return LoaderResult(
        len(shards.paths),
        shards.num_tokens,
        seq_len,
        batch,
        steps,
        tokens,
        seconds,
        shards.dtype.itemsize,
    )
