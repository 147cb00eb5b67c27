"""The deterministic pretraining loader: packed, shuffled chunks of the token stream.

The shards are one stream of tokens (documents separated by EOS). Chunk k is the ``seq_len + 1``
tokens starting at ``k * seq_len``; its first ``seq_len`` are the inputs and its last ``seq_len``
the targets, so consecutive chunks overlap by one token and every token is a target exactly once
per epoch. There are ``n_chunks = (num_tokens - 1) // seq_len`` chunks.

Global sequence g (``g = step * global_batch_size + i``) is chunk ``perm_e[g % n_chunks]`` with
epoch ``e = g // n_chunks``; ``perm_e`` is a permutation seeded by ``(seed, e)``. The position is
a single integer (the step), so resuming is exact, memory is O(n_chunks) however long the run, and
the global order does not depend on the number of ranks: rank r of W reads the contiguous slice
``[r * G/W, (r+1) * G/W)`` of each global batch. Concatenating all ranks' micro-batches of a step
gives exactly the single-process global batch, so the loss of a W-rank run equals a 1-rank run's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from crucible.data.prefetch import Prefetcher
from crucible.data.shards import ShardSet

STATE_VERSION = 1


@dataclass
class Batch:
    tokens: torch.Tensor  # int64 [B, T]: model inputs
    targets: torch.Tensor  # int64 [B, T]: next tokens (tokens shifted by one)
    doc_ids: torch.Tensor  # int64 [B, T]: 0 at each row start, +1 after every EOS input token
    # int64 [B]: index of the source each row was drawn from (MixtureLoader); None otherwise.
    source_ids: torch.Tensor | None = None

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return Batch(
            self.tokens.to(device, non_blocking=non_blocking),
            self.targets.to(device, non_blocking=non_blocking),
            self.doc_ids.to(device, non_blocking=non_blocking),
            self.source_ids,  # bookkeeping: stays on the host
        )

    def pin_memory(self) -> Batch:
        return Batch(
            self.tokens.pin_memory(),
            self.targets.pin_memory(),
            self.doc_ids.pin_memory(),
            self.source_ids,
        )

    @property
    def num_tokens(self) -> int:
        return self.tokens.numel()


def doc_ids_from_tokens(tokens: np.ndarray, eos_id: int) -> np.ndarray:
    """Per-row document index: the EOS belongs to the document it ends, the next token starts one."""
    is_eos = (tokens == eos_id).astype(np.int64)
    return np.cumsum(is_eos, axis=-1) - is_eos


def make_batch(chunks: np.ndarray, eos_id: int) -> Batch:
    """Batch from int64 rows of ``seq_len + 1`` tokens."""
    tokens = np.ascontiguousarray(chunks[:, :-1])
    targets = np.ascontiguousarray(chunks[:, 1:])
    doc_ids = doc_ids_from_tokens(tokens, eos_id)
    return Batch(torch.from_numpy(tokens), torch.from_numpy(targets), torch.from_numpy(doc_ids))


def _resolve_eos(shards: ShardSet, eos_id: int | None) -> int:
    eos = eos_id if eos_id is not None else shards.eos_id
    if eos is None:
        raise ValueError(f"{shards} has no dataset.json naming the EOS id: pass eos_id=")
    return int(eos)


def _num_chunks(shards: ShardSet, seq_len: int) -> int:
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    n = (shards.num_tokens - 1) // seq_len
    if n < 1:
        raise ValueError(
            f"{shards} has {shards.num_tokens} tokens, fewer than one sequence of "
            f"seq_len + 1 = {seq_len + 1}"
        )
    return n


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """Permutation of range(n) determined by (seed, epoch) alone.

    Sorting raw PCG64 outputs, instead of `Generator.permutation`, keeps the order identical across
    numpy versions: numpy guarantees bit-generator streams, not the algorithms built on them.
    """
    keys = np.random.PCG64(np.random.SeedSequence([seed, epoch])).random_raw(n)
    return np.argsort(keys, kind="stable")


class EpochOrder:
    """Global sequence index -> item: epoch after epoch over `n` items, each epoch a fresh
    seeded permutation (or in order). Shared by the pretraining and SFT loaders."""

    def __init__(self, n: int, seed: int, shuffle: bool = True) -> None:
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            # Keep at most the previous epoch too: a step may straddle an epoch boundary.
            self._perms = {e: p for e, p in self._perms.items() if e == epoch - 1}
            self._perms[epoch] = epoch_permutation(self.n, self.seed, epoch)
        return self._perms[epoch]

    def __call__(self, global_indices: np.ndarray) -> np.ndarray:
        g = np.asarray(global_indices, dtype=np.int64)
        if not self.shuffle:
            return g % self.n
        epochs, within = np.divmod(g, self.n)
        out = np.empty_like(g)
        for e in np.unique(epochs):
            sel = epochs == e
            out[sel] = self._perm(int(e))[within[sel]]
        return out


def _read_chunks(shards: ShardSet, chunk_ids: np.ndarray, seq_len: int) -> np.ndarray:
    out = np.empty((len(chunk_ids), seq_len + 1), dtype=np.int64)
    for row, c in enumerate(chunk_ids):
        start = int(c) * seq_len
        out[row] = shards.read(start, start + seq_len + 1)
    return out


class StepIterator:
    """Iteration for loaders whose batches are a pure function of the step (`step_batches`)."""

    step: int
    _prefetcher: Prefetcher | None = None

    def enable_prefetch(self, pin_memory: bool = False) -> None:
        """Build the next step's batches in a background thread (see `crucible.data.prefetch`)."""
        if self._prefetcher is None:
            self._prefetcher = Prefetcher(self.step_batches, pin_memory)  # type: ignore[attr-defined]

    def close(self) -> None:
        if self._prefetcher is not None:
            self._prefetcher.close()
            self._prefetcher = None

    def next_step(self) -> list[Batch]:
        step = self.step
        if self._prefetcher is None:
            batches = self.step_batches(step)  # type: ignore[attr-defined]
        else:
            batches = self._prefetcher.take(step)
            self._prefetcher.start(step + 1)
        self.step = step + 1
        return batches

    def __iter__(self) -> StepIterator:
        return self

    def __next__(self) -> list[Batch]:
        return self.next_step()


class PretrainLoader(StepIterator):
    """Yields, per optimizer step, this rank's micro-batches of the global batch."""

    def __init__(
        self,
        shards: ShardSet,
        seq_len: int,
        global_batch_size: int,
        micro_batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        eos_id: int | None = None,
    ):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if micro_batch_size < 1 or global_batch_size % (micro_batch_size * world_size):
            raise ValueError(
                f"global_batch_size {global_batch_size} must be divisible by micro_batch_size "
                f"{micro_batch_size} x world_size {world_size} = {micro_batch_size * world_size}"
            )
        self.shards = shards
        self.seq_len = seq_len
        self.n_chunks = _num_chunks(shards, seq_len)
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.eos_id = _resolve_eos(shards, eos_id)
        self.step = 0
        self._order = EpochOrder(self.n_chunks, seed, shuffle)

    # -- position

    @property
    def epoch(self) -> int:
        """Epoch of the next sequence to be read (0-based)."""
        return self.step * self.global_batch_size // self.n_chunks

    @property
    def tokens_seen(self) -> int:
        """Input tokens of all ranks consumed so far."""
        return self.step * self.global_batch_size * self.seq_len

    @property
    def steps_per_epoch(self) -> float:
        return self.n_chunks / self.global_batch_size

    # -- order

    def chunk_ids(self, global_indices: np.ndarray) -> np.ndarray:
        """Chunk read for each global sequence index."""
        return self._order(global_indices)

    def step_batches(self, step: int) -> list[Batch]:
        """This rank's micro-batches of optimizer step `step`, without moving the position."""
        per_rank = self.global_batch_size // self.world_size
        base = step * self.global_batch_size + self.rank * per_rank
        batches = []
        for start in range(0, per_rank, self.micro_batch_size):
            g = base + start + np.arange(self.micro_batch_size)
            rows = _read_chunks(self.shards, self.chunk_ids(g), self.seq_len)
            batches.append(make_batch(rows, self.eos_id))
        return batches

    # -- checkpointing

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position. Rank-independent: resuming on another world size works."""
        return {
            "version": STATE_VERSION,
            "step": self.step,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "seq_len": self.seq_len,
            "global_batch_size": self.global_batch_size,
            "n_chunks": self.n_chunks,
            "num_tokens": self.shards.num_tokens,
            "epoch": self.epoch,
            "tokens_seen": self.tokens_seen,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        expected = {
            "seq_len": self.seq_len,
            "global_batch_size": self.global_batch_size,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "n_chunks": self.n_chunks,
        }
        for key, ours in expected.items():
            if key not in state:
                raise ValueError(f"loader state has no '{key}': not a PretrainLoader state")
            if state[key] != ours:
                hint = " (the training data changed)" if key == "n_chunks" else ""
                raise ValueError(
                    f"cannot resume loader: checkpoint has {key}={state[key]} but this run has "
                    f"{key}={ours}{hint}"
                )
        if int(state["step"]) < 0:
            raise ValueError(f"loader state has negative step {state['step']}")
        self.step = int(state["step"])


def eval_batches(
    shards: ShardSet,
    seq_len: int,
    micro_batch_size: int,
    num_batches: int,
    rank: int = 0,
    world_size: int = 1,
    eos_id: int | None = None,
) -> list[Batch]:
    """Fixed validation micro-batches of this rank: unshuffled chunks spread evenly over the data.

    `num_batches` counts micro-batches over all ranks; it is rounded up to a multiple of
    `world_size` so each rank runs the same number (FSDP needs that), and lowered when the data has
    too few chunks. When `world_size` divides it, the union over ranks equals the 1-rank set, so the
    validation loss is comparable across world sizes. Every call returns the same batches.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    if micro_batch_size < 1 or num_batches < 1:
        raise ValueError("micro_batch_size and num_batches must be >= 1")
    n_chunks = _num_chunks(shards, seq_len)
    eos = _resolve_eos(shards, eos_id)
    per_rank = math.ceil(num_batches / world_size)
    per_rank = max(1, min(per_rank, n_chunks // (micro_batch_size * world_size)))
    total = per_rank * micro_batch_size * world_size
    # floor(k * n / total): distinct and evenly spaced when total <= n_chunks.
    chunk_ids = np.arange(total, dtype=np.int64) * n_chunks // total
    mine = chunk_ids.reshape(world_size, per_rank, micro_batch_size)[rank]
    return [make_batch(_read_chunks(shards, ids, seq_len), eos) for ids in mine]
