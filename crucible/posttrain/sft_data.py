"""SFT data: conversations to labelled token sequences, packed or padded into training batches.

Labels follow TRL's SFT data path: a token keeps its id as label when it is inside the assistant
mask (``loss="assistant"``), and also after the prompt of the last assistant turn
(``loss="completion"``); every other label is -100. A batch row then holds inputs
``ids[:-1]`` and targets ``labels[1:]`` of each example, so an example of L tokens takes L - 1
positions and fits a row of ``seq_len`` when ``L <= seq_len + 1``.

* Truncation is explicit: a longer example is dropped (default), cut (``keep_start``), or an
  error; each case is counted in `SFTStats`. A cut example left without supervised tokens is
  dropped and counted too.
* Packing is best-fit-decreasing: examples sorted by length, longest first, each placed in the
  open row with the least room that still fits it. Each example is one document (its own doc id),
  so with ``model.doc_masking`` it attends only to itself and its positions restart at 0: a packed
  row gives exactly the logits of its examples run one by one.
* `SFTLoader` yields per optimizer step this rank's micro-batches, in the shape of
  `crucible.data.loader.Batch`; row order is a seeded permutation per epoch and the position is
  one integer (the step), so resuming is exact.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np
import torch

from crucible.config import ConfigError
from crucible.data.loader import Batch, EpochOrder, StepIterator
from crucible.model.loss import IGNORE_INDEX
from crucible.posttrain.chat_template import ChatEncoder, TemplateRenderError
from crucible.posttrain.conversations import Conversation, Issue

LossMode = Literal["assistant", "completion"]
Truncation = Literal["drop", "keep_start", "error"]
STATE_VERSION = 1


@dataclass
class Example:
    ids: np.ndarray  # int32 [L]
    labels: np.ndarray  # int32 [L]: the id where supervised, else -100 (not shifted)
    record: str
    truncated: bool = False

    @property
    def num_supervised(self) -> int:
        """Supervised targets once shifted (the first token is never a target)."""
        return int((self.labels[1:] != IGNORE_INDEX).sum())


@dataclass
class SFTStats:
    records: int = 0
    examples: int = 0
    tokens: int = 0
    supervised: int = 0
    truncated: int = 0  # cut to max_tokens and kept
    too_long: int = 0  # dropped (or cut to nothing supervised)
    issues: list[Issue] = field(default_factory=list)

    @property
    def supervised_share(self) -> float:
        return self.supervised / self.tokens if self.tokens else 0.0

    def summary(self, show: int = 3) -> str:
        lines = [
            f"{self.examples} of {self.records} conversations tokenized: {self.tokens:,} tokens, "
            f"{self.supervised:,} supervised ({self.supervised_share:.1%})"
        ]
        if self.truncated:
            lines.append(f"  {self.truncated} cut to the maximum length (keep_start)")
        if self.too_long:
            lines.append(f"  {self.too_long} dropped: longer than the maximum length")
        other = [i for i in self.issues if i.kind != "too long"]
        if other:
            lines.append(f"  {len(other)} left out:")
            lines += [f"    {i}" for i in other[:show]]
        return "\n".join(lines)


def completion_mask(encoder: ChatEncoder, conv: Conversation, ids: Sequence[int]) -> list[int]:
    """1 on the tokens after the prompt of the last assistant turn (TRL's completion mask).

    The prompt is the messages before the last assistant message, rendered with the generation
    prompt; the completion starts where its tokens stop matching the full conversation's.
    """
    last = conv.last_assistant
    prompt = encoder.encode(
        conv, messages=conv.template_messages()[:last], add_generation_prompt=True
    ).ids
    n = 0
    for a, b in zip(prompt, ids):
        if a != b:
            break
        n += 1
    return [0] * n + [1] * (len(ids) - n)


def tokenize_conversation(
    encoder: ChatEncoder, conv: Conversation, loss: LossMode = "assistant"
) -> Example:
    """One conversation to an Example (TemplateRenderError when the template fails)."""
    enc = encoder.encode(conv)
    keep = enc.mask
    if loss == "completion":
        keep = [a & c for a, c in zip(keep, completion_mask(encoder, conv, enc.ids))]
    ids = np.asarray(enc.ids, dtype=np.int32)
    labels = np.where(np.asarray(keep, dtype=bool), ids, IGNORE_INDEX).astype(np.int32)
    return Example(ids, labels, conv.name)


def tokenize_conversations(
    conversations: Iterable[Conversation],
    encoder: ChatEncoder,
    *,
    loss: LossMode = "assistant",
    max_tokens: int | None = None,
    truncation: Truncation = "drop",
    template_kwargs: dict[str, Any] | None = None,
) -> tuple[list[Example], SFTStats]:
    """Tokenize and label conversations; problems are named and counted in the stats.

    A conversation is left out (and listed in ``stats.issues``) when its text contains a special
    token of the tokenizer, the template raises, it has no supervised token, or it is longer
    than `max_tokens` with truncation "drop". With "error" that is a ConfigError instead.
    `template_kwargs` are defaults under each record's own chat_template_kwargs. Give
    ``today_date`` there (e.g. the run's start date): records without one otherwise render
    today's date, and a run resumed on another day would see different tokens.
    """
    if loss not in ("assistant", "completion"):
        raise ConfigError(f"loss must be 'assistant' or 'completion', got {loss!r}")
    if truncation not in ("drop", "keep_start", "error"):
        raise ConfigError(f"truncation must be 'drop', 'keep_start' or 'error', got {truncation!r}")
    stats, out = SFTStats(), []
    defaults = template_kwargs or {}
    for conv in conversations:
        stats.records += 1
        if defaults:
            conv = replace(conv, template_kwargs={**defaults, **conv.template_kwargs})
        special = encoder.contains_special(conv)
        if special is not None:
            stats.issues.append(
                Issue(conv.name, "special token", f"its text contains the special token {special}")
            )
            continue
        try:
            ex = tokenize_conversation(encoder, conv, loss)
        except TemplateRenderError as e:
            stats.issues.append(Issue(conv.name, "template error", str(e)))
            continue
        if max_tokens is not None and len(ex.ids) > max_tokens:
            what = f"{len(ex.ids)} tokens > the maximum {max_tokens}"
            if truncation == "error":
                raise ConfigError(f"{conv.name}: {what} (truncation: error)")
            if truncation == "drop":
                stats.too_long += 1
                stats.issues.append(Issue(conv.name, "too long", what))
                continue
            ex = Example(ex.ids[:max_tokens], ex.labels[:max_tokens], ex.record, truncated=True)
            if ex.num_supervised == 0:
                stats.too_long += 1
                stats.issues.append(Issue(conv.name, "too long", f"{what}; nothing left to learn"))
                continue
            stats.truncated += 1
        if ex.num_supervised == 0:
            stats.issues.append(
                Issue(conv.name, "no supervised tokens", "no token is in the loss mask")
            )
            continue
        out.append(ex)
        stats.examples += 1
        stats.tokens += len(ex.ids)
        stats.supervised += ex.num_supervised
    return out, stats


# --------------------------------------------------------------------------- packing


def pack_bfd(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Best-fit-decreasing bins of indices: each bin's lengths sum to at most `capacity`.

    Items go longest first (ties by index) into the bin with the least remaining room that fits
    them, or a new bin. Deterministic. An item longer than `capacity` is a ValueError.
    """
    too_long = [i for i, n in enumerate(lengths) if n > capacity]
    if too_long:
        raise ValueError(
            f"{len(too_long)} item(s) longer than the bin capacity {capacity} "
            f"(first: item {too_long[0]}, length {lengths[too_long[0]]})"
        )
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (remaining room, bin index), sorted
    for i in order:
        k = bisect.bisect_left(free, (lengths[i], -1))
        if k < len(free):
            room, b = free.pop(k)
        else:
            room, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        room -= lengths[i]
        if room > 0:
            bisect.insort(free, (room, b))
    return bins


# --------------------------------------------------------------------------- batches


@dataclass
class SFTBatch(Batch):
    """A `Batch` (tokens, targets with -100 where unsupervised, doc_ids) plus bookkeeping."""

    records: tuple[tuple[str, ...], ...] = ()  # the conversations of each row
    packed: bool = False  # rows may hold several documents (needs model.doc_masking)
    step_supervised: int = 0  # supervised targets in the whole global batch of this step

    @property
    def num_supervised(self) -> int:
        return int((self.targets != IGNORE_INDEX).sum())

    def to(self, device: torch.device | str, non_blocking: bool = False) -> SFTBatch:
        b = super().to(device, non_blocking)
        return SFTBatch(b.tokens, b.targets, b.doc_ids, None, self.records, self.packed,
                        self.step_supervised)  # fmt: skip

    def pin_memory(self) -> SFTBatch:
        b = super().pin_memory()
        return SFTBatch(b.tokens, b.targets, b.doc_ids, None, self.records, self.packed,
                        self.step_supervised)  # fmt: skip


def build_rows(
    examples: Sequence[Example], rows: Sequence[Sequence[int]], width: int, pad_id: int,
    packed: bool,
) -> SFTBatch:  # fmt: skip
    """Rows of examples ([[example index, ...], ...]) as a batch of `width` columns."""
    n = len(rows)
    tokens = np.full((n, width), pad_id, dtype=np.int64)
    targets = np.full((n, width), IGNORE_INDEX, dtype=np.int64)
    doc_ids = np.zeros((n, width), dtype=np.int64)
    for r, row in enumerate(rows):
        pos = 0
        for d, i in enumerate(row):
            ex = examples[i]
            k = len(ex.ids) - 1
            if pos + k > width:
                raise ValueError(f"row {r} needs more than {width} positions")
            tokens[r, pos : pos + k] = ex.ids[:-1]
            targets[r, pos : pos + k] = ex.labels[1:]
            doc_ids[r, pos : pos + k] = d
            pos += k
        doc_ids[r, pos:] = len(row)  # padding is a document of its own
    names = tuple(tuple(examples[i].record for i in row) for row in rows)
    batch = SFTBatch(
        torch.from_numpy(tokens), torch.from_numpy(targets), torch.from_numpy(doc_ids),
        None, names, packed,
    )  # fmt: skip
    if batch.num_supervised == 0:
        shown = ", ".join([x for row in names for x in row][:5])
        raise ConfigError(f"a batch has no supervised tokens (records: {shown})")
    return batch


class SFTLoader(StepIterator):
    """Per optimizer step, this rank's micro-batches of `global_batch_size` rows.

    packing=True: rows are best-fit-decreasing bins of ``seq_len`` positions, padded to
    ``seq_len``. packing=False: one example per row, padded to the longest row of the
    micro-batch. Global row g of the run is row ``perm_e[g % n_rows]`` of epoch
    ``e = g // n_rows``; ranks read contiguous slices of each global batch.
    """

    def __init__(
        self,
        examples: Sequence[Example],
        seq_len: int,
        global_batch_size: int,
        micro_batch_size: int,
        *,
        pad_id: int,
        packing: bool = True,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
    ):
        if not examples:
            raise ConfigError("no SFT examples to train on")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if micro_batch_size < 1 or global_batch_size % (micro_batch_size * world_size):
            raise ValueError(
                f"global_batch_size {global_batch_size} must be divisible by micro_batch_size "
                f"{micro_batch_size} x world_size {world_size} = {micro_batch_size * world_size}"
            )
        lengths = [len(e.ids) - 1 for e in examples]
        long = [e.record for e, n in zip(examples, lengths) if n > seq_len]
        if long:
            raise ConfigError(
                f"{len(long)} example(s) longer than seq_len + 1 = {seq_len + 1} tokens "
                f"(first: {long[0]}); tokenize with max_tokens=seq_len + 1"
            )
        self.examples = list(examples)
        self.seq_len, self.packing, self.pad_id = seq_len, packing, pad_id
        self.global_batch_size, self.micro_batch_size = global_batch_size, micro_batch_size
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.rows = pack_bfd(lengths, seq_len) if packing else [[i] for i in range(len(lengths))]
        supervised = np.array([e.num_supervised for e in self.examples], dtype=np.int64)
        self._row_supervised = np.array([supervised[r].sum() for r in self.rows], dtype=np.int64)
        self.fingerprint = _fingerprint(self.examples)
        self.step = 0
        self._order = EpochOrder(len(self.rows), seed, shuffle)

    @property
    def n_rows(self) -> int:
        return len(self.rows)

    @property
    def epoch(self) -> int:
        return self.step * self.global_batch_size // self.n_rows

    @property
    def steps_per_epoch(self) -> float:
        return self.n_rows / self.global_batch_size

    def stats(self) -> dict[str, Any]:
        """Rows, supervised share, and fill: the share of the rows' seq_len positions that hold
        tokens (padded rows are counted at seq_len, though micro-batches pad to their longest)."""
        tokens = sum(len(self.examples[i].ids) - 1 for r in self.rows for i in r)
        width = self.seq_len
        sup = int(self._row_supervised.sum())
        return {
            "examples": len(self.examples),
            "rows": self.n_rows,
            "tokens": tokens,
            "supervised": sup,
            "supervised_share": sup / tokens,
            "fill": tokens / (self.n_rows * width),
        }

    def row_ids(self, global_indices: np.ndarray) -> np.ndarray:
        """Row read for each global sequence index."""
        return self._order(global_indices)

    def step_batches(self, step: int) -> list[SFTBatch]:
        """This rank's micro-batches of optimizer step `step`, without moving the position."""
        start = step * self.global_batch_size
        all_rows = self.row_ids(start + np.arange(self.global_batch_size))
        step_supervised = int(self._row_supervised[all_rows].sum())
        per_rank = self.global_batch_size // self.world_size
        mine = all_rows[self.rank * per_rank : (self.rank + 1) * per_rank]
        batches = []
        for k in range(0, per_rank, self.micro_batch_size):
            rows = [self.rows[r] for r in mine[k : k + self.micro_batch_size]]
            width = self.seq_len
            if not self.packing:
                width = max(len(self.examples[row[0]].ids) - 1 for row in rows)
            b = build_rows(self.examples, rows, width, self.pad_id, self.packing)
            b.step_supervised = step_supervised
            batches.append(b)
        return batches

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "step": self.step,
            "epoch": self.epoch,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "packing": self.packing,
            "seq_len": self.seq_len,
            "global_batch_size": self.global_batch_size,
            "n_rows": self.n_rows,
            "fingerprint": self.fingerprint,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        expected = {
            "seq_len": self.seq_len,
            "global_batch_size": self.global_batch_size,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "packing": self.packing,
            "n_rows": self.n_rows,
            "fingerprint": self.fingerprint,
        }
        for key, ours in expected.items():
            if key not in state:
                raise ValueError(f"loader state has no '{key}': not an SFTLoader state")
            if state[key] != ours:
                hint = " (the SFT data changed)" if key in ("n_rows", "fingerprint") else ""
                raise ValueError(
                    f"cannot resume SFT loader: checkpoint has {key}={state[key]} but this run "
                    f"has {key}={ours}{hint}"
                )
        if int(state["step"]) < 0:
            raise ValueError(f"loader state has negative step {state['step']}")
        self.step = int(state["step"])


def _fingerprint(examples: Sequence[Example]) -> str:
    h = hashlib.sha256()
    for e in examples:
        h.update(np.int64(len(e.ids)).tobytes())
        h.update(e.ids.tobytes())
        h.update(e.labels.tobytes())
    return h.hexdigest()[:16]
