"""Weighted mixtures of sources over multi-stage schedules, deterministic and resumable.

Each source is its own `ShardSet`, cut into chunks of ``seq_len + 1`` tokens like `PretrainLoader`.
A stage lasts a number of optimizer steps (the last may be open-ended) and gives each source a
weight. Which source serves global sequence ``g`` is a pure function of ``g``:

* Within a stage, the first n sequences hold exactly ``C_s(n) = F_s(n) - F_{s-1}(n)`` sequences of
  source s, with ``F_s(n) = floor(n * W_s + 1/2)`` and ``W_s`` the cumulative normalised weight
  (exact fractions). So every source's count is within one sequence of ``n * w_s`` at any n,
  counts never decrease, and they sum to n.
* Sequences are dealt in blocks of `block_size`: block b holds ``C_s(end) - C_s(start)`` of source
  s, in an order shuffled by ``(seed, stage, block)``.
* The d-th sequence ever drawn from source s (counted across stages) is chunk
  ``perm_s,e[d mod n_chunks_s]`` with epoch ``e = d // n_chunks_s``, a permutation seeded by
  ``(seed, source name, e)``: every chunk of a source is seen once per epoch of that source.

The position is still one integer (the step), memory is O(chunks + block_size), and
`accounting` gives exact sequence, token and epoch counts per source and stage.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import numpy as np
import torch

from crucible.data.loader import (
    Batch,
    StepIterator,
    _num_chunks,
    _read_chunks,
    _resolve_eos,
    make_batch,
)
from crucible.data.shards import ShardSet

MIXTURE_STATE_VERSION = 1
EPOCH_WARNING = 4.0  # Muennighoff et al. 2023: gains fade after ~4 epochs of repetition


@dataclass(frozen=True)
class Stage:
    """`steps` optimizer steps (None: until the run ends; only the last stage) with `weights`."""

    name: str
    weights: Mapping[str, float]
    steps: int | None = None


def _cumulative(weights: Mapping[str, float], names: Sequence[str]) -> list[Fraction]:
    w = [Fraction(weights.get(n, 0.0)) for n in names]
    if any(x < 0 for x in w) or sum(w) <= 0:
        raise ValueError(f"weights must be >= 0 with a positive sum, got {dict(weights)}")
    total = sum(w)
    cum, acc = [], Fraction(0)
    for x in w:
        acc += x / total
        cum.append(acc)
    return cum


def stage_counts(cum: Sequence[Fraction], n: int) -> np.ndarray:
    """int64[sources]: how many of the first n sequences of a stage each source serves."""
    half = Fraction(1, 2)
    bounds = [0] + [int(n * w + half) for w in cum]  # int() floors: n * w + 1/2 >= 0
    return np.diff(np.asarray(bounds, dtype=np.int64))


def _keyed_perm(n: int, *key: int) -> np.ndarray:
    raw = np.random.PCG64(np.random.SeedSequence(list(key))).random_raw(n)
    return np.argsort(raw, kind="stable")


def _name_key(name: str) -> int:
    return zlib.crc32(name.encode())


@dataclass
class _Block:
    source: np.ndarray  # int64[len]: source index of each position
    draw: np.ndarray  # int64[len]: draw index within its source, counted from the run start


@dataclass
class MixtureLoader(StepIterator):
    """Like `PretrainLoader`, over several sources; batches carry `source_ids`."""

    sources: Mapping[str, ShardSet]
    stages: Sequence[Stage]
    seq_len: int
    global_batch_size: int
    micro_batch_size: int
    rank: int = 0
    world_size: int = 1
    seed: int = 0
    eos_id: int | None = None
    block_size: int = 4096
    step: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if not self.stages:
            raise ValueError("a mixture needs at least one stage")
        if any(s.steps is None for s in self.stages[:-1]):
            raise ValueError("only the last stage may have steps=None (open-ended)")
        if any(s.steps is not None and s.steps < 1 for s in self.stages):
            raise ValueError("stage steps must be >= 1")
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside world_size {self.world_size}")
        if self.micro_batch_size < 1 or self.global_batch_size % (
            self.micro_batch_size * self.world_size
        ):
            raise ValueError("global_batch_size must be divisible by micro_batch_size x world_size")
        used = {n for s in self.stages for n, w in s.weights.items() if w > 0}
        missing = used - set(self.sources)
        if missing:
            raise ValueError(f"stages weight sources that are not given: {sorted(missing)}")
        self.names = sorted(self.sources)
        self.n_chunks = np.array(
            [_num_chunks(self.sources[n], self.seq_len) for n in self.names], dtype=np.int64
        )
        eos = {_resolve_eos(self.sources[n], self.eos_id) for n in self.names}
        if len(eos) != 1:
            raise ValueError(f"sources disagree on the EOS id: {sorted(eos)}")
        self.eos = eos.pop()
        self._cum = [_cumulative(s.weights, self.names) for s in self.stages]
        # Sequences per stage and the draws of each source before each stage starts.
        self._stage_seqs = [
            None if s.steps is None else s.steps * self.global_batch_size for s in self.stages
        ]
        self._stage_start = [0]
        self._draws_before = [np.zeros(len(self.names), dtype=np.int64)]
        for k, n in enumerate(self._stage_seqs[:-1]):
            assert n is not None
            self._stage_start.append(self._stage_start[-1] + n)
            self._draws_before.append(self._draws_before[-1] + stage_counts(self._cum[k], n))
        self._blocks: dict[tuple[int, int], _Block] = {}
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    # -- the schedule

    def _stage_of(self, g: int) -> int:
        k = int(np.searchsorted(self._stage_start, g, side="right")) - 1
        return k

    def _block(self, stage: int, b: int) -> _Block:
        key = (stage, b)
        if key not in self._blocks:
            if len(self._blocks) > 8:  # a step touches one or two blocks: keep a few
                self._blocks.clear()
            n_stage = self._stage_seqs[stage]
            start = b * self.block_size
            end = start + self.block_size
            if n_stage is not None and stage < len(self.stages) - 1:
                end = min(end, n_stage)  # the last stage's weights continue after its end
            cum = self._cum[stage]
            before = stage_counts(cum, start)
            quota = stage_counts(cum, end) - before
            source = np.repeat(np.arange(len(self.names)), quota)
            source = source[_keyed_perm(len(source), self.seed, 1, stage, b)]
            # Rank of each position among the block's positions of the same source.
            order = np.argsort(source, kind="stable")
            rank = np.empty(len(source), dtype=np.int64)
            first = np.concatenate([[0], np.cumsum(quota)[:-1]])
            rank[order] = np.arange(len(source)) - np.repeat(first, quota)
            draw = self._draws_before[stage][source] + before[source] + rank
            self._blocks[key] = _Block(source.astype(np.int64), draw)
        return self._blocks[key]

    def _source_perm(self, s: int, epoch: int) -> np.ndarray:
        key = (s, epoch)
        if key not in self._perms:
            if len(self._perms) > 4 * len(self.names):
                self._perms.clear()
            name_key = _name_key(self.names[s])
            self._perms[key] = _keyed_perm(int(self.n_chunks[s]), self.seed, 2, name_key, epoch)
        return self._perms[key]

    def stage_at_step(self, step: int) -> str:
        """Name of the stage that optimizer step `step` (0-based) draws from."""
        return self.stages[self._stage_of(step * self.global_batch_size)].name

    def locate(self, g: int) -> tuple[int, int]:
        """(source index, chunk index) of global sequence g."""
        k = self._stage_of(g)
        local = g - self._stage_start[k]
        blk = self._block(k, local // self.block_size)
        i = local % self.block_size
        s, d = int(blk.source[i]), int(blk.draw[i])
        epoch, within = divmod(d, int(self.n_chunks[s]))
        return s, int(self._source_perm(s, epoch)[within])

    # -- batches

    def step_batches(self, step: int) -> list[Batch]:
        per_rank = self.global_batch_size // self.world_size
        base = step * self.global_batch_size + self.rank * per_rank
        batches = []
        for start in range(0, per_rank, self.micro_batch_size):
            located = [self.locate(base + start + i) for i in range(self.micro_batch_size)]
            rows = np.empty((len(located), self.seq_len + 1), dtype=np.int64)
            for r, (s, chunk) in enumerate(located):
                shards = self.sources[self.names[s]]
                rows[r] = _read_chunks(shards, np.array([chunk]), self.seq_len)[0]
            batch = make_batch(rows, self.eos)
            batch.source_ids = torch.tensor([s for s, _ in located], dtype=torch.int64)
            batches.append(batch)
        return batches

    @property
    def tokens_seen(self) -> int:
        return self.step * self.global_batch_size * self.seq_len

    # -- accounting

    def draws(self, num_sequences: int) -> np.ndarray:
        """int64[sources]: sequences drawn from each source among the first `num_sequences`."""
        k = self._stage_of(num_sequences)
        local = num_sequences - self._stage_start[k]
        return self._draws_before[k] + stage_counts(self._cum[k], local)

    def accounting(self, total_steps: int | None = None) -> list[dict[str, Any]]:
        """Per stage and source: sequences, tokens (inputs), and epochs of that source drawn by
        the end of the stage (cumulative). An open-ended last stage needs `total_steps`."""
        rows = []
        for k, stage in enumerate(self.stages):
            start = self._stage_start[k]
            if self._stage_seqs[k] is not None:
                end = start + self._stage_seqs[k]
            elif total_steps is not None:
                end = max(start, total_steps * self.global_batch_size)
            else:
                raise ValueError("the last stage is open-ended: pass total_steps")
            if total_steps is not None:
                end = min(end, total_steps * self.global_batch_size)
            if end <= start and k:
                break
            during = self.draws(end) - self.draws(start)
            cumulative = self.draws(end)
            for s, name in enumerate(self.names):
                epochs = cumulative[s] / self.n_chunks[s]
                rows.append(
                    {
                        "stage": stage.name,
                        "source": name,
                        "sequences": int(during[s]),
                        "tokens": int(during[s]) * self.seq_len,
                        "share": float(during[s] / max(1, end - start)),
                        "epochs_cumulative": float(epochs),
                        "warning": bool(epochs > EPOCH_WARNING),
                    }
                )
        return rows

    # -- checkpointing

    def _fingerprint(self) -> dict[str, Any]:
        return {
            "seq_len": self.seq_len,
            "global_batch_size": self.global_batch_size,
            "seed": self.seed,
            "block_size": self.block_size,
            "sources": {n: int(c) for n, c in zip(self.names, self.n_chunks)},
            "stages": [
                {"name": s.name, "steps": s.steps, "weights": dict(sorted(s.weights.items()))}
                for s in self.stages
            ],
        }

    def state_dict(self) -> dict[str, Any]:
        n = self.step * self.global_batch_size
        drawn = {name: int(d) for name, d in zip(self.names, self.draws(n))}
        return {
            "version": MIXTURE_STATE_VERSION,
            "step": self.step,
            "stage": self.stages[self._stage_of(n)].name,
            "sequences_per_source": drawn,
            **self._fingerprint(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, ours in self._fingerprint().items():
            if state.get(key) != ours:
                raise ValueError(
                    f"cannot resume mixture loader: checkpoint has {key}={state.get(key)} "
                    f"but this run has {key}={ours}"
                )
        self.step = int(state["step"])


def plan_epochs(
    stages: Sequence[tuple[str, float, Mapping[str, float]]],
    available_tokens: Mapping[str, float],
    max_epochs: float = EPOCH_WARNING,
) -> list[dict[str, Any]]:
    """Token accounting of a planned schedule, before any data exists (playbook 3.6).

    `stages`: (name, tokens, weights). Per source: drawn tokens summed over stages, epochs =
    drawn / available, and the largest weight each stage could give it within `max_epochs`
    if it were the only stage.
    """
    drawn: dict[str, float] = {}
    rows = []
    for name, tokens, weights in stages:
        total = sum(weights.values())
        for src, w in weights.items():
            share = w / total
            drawn[src] = drawn.get(src, 0.0) + tokens * share
            avail = available_tokens[src]
            rows.append(
                {
                    "stage": name,
                    "source": src,
                    "tokens": tokens * share,
                    "epochs_cumulative": drawn[src] / avail,
                    "max_share": max_epochs * avail / tokens,
                    "warning": drawn[src] / avail > max_epochs,
                }
            )
    return rows
