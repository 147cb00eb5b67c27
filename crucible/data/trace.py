"""One document through the steps (`trace_document`), then the order-dependent part (`Merger`).

Filters are pure functions of a document, so they can run anywhere, in any order, in any process.
Deduplication is not: the first document of a group is kept, so it depends on the order of the
whole stream. A trace therefore runs every filter up to the first removal and, at each dedup step,
records the document's dedup *key* (a digest, or a MinHash signature) without deciding. `Merger`
then takes traces in input order, decides dedup against one index, counts every statistic and
keeps the seeded removal sample. One process or many produce the same traces, so the same merged
output, byte for byte. The price: a document that an early dedup step removes has still been
through the later filters (put dedup last, as usual, and nothing is wasted).
"""

from __future__ import annotations

import base64
import json
import random
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from crucible.data.corpora import Document
from crucible.data.dedup import ExactDedup, MinHashDedup
from crucible.data.filters import FilterResult

Filter = Callable[[str], FilterResult]
Dedup = ExactDedup | MinHashDedup
Step = Filter | Dedup
SAMPLE_CHARS = 2000  # removed texts are cut to this in the sample file


def step_name(step: Step) -> str:
    return getattr(step, "name", type(step).__name__)


@dataclass
class DocResult:
    """What the steps did to one document, before dedup decisions."""

    source: str
    id: str
    bytes_in: int
    stop: int  # index of the filter that removed it; len(steps) when none did
    reason: str | None  # that filter's reason
    text: str  # the text after the filters ("" when removed)
    original: str | None  # the input cut to SAMPLE_CHARS, when `text` is not the input
    keys: list[tuple[int, bytes | None]] = field(default_factory=list)  # (dedup step, key)

    @property
    def sample_text(self) -> str:
        return self.original if self.original is not None else self.text[:SAMPLE_CHARS]

    def to_json(self) -> str:
        keys = [[i, None if k is None else base64.b64encode(k).decode()] for i, k in self.keys]
        return json.dumps(
            [
                self.source,
                self.id,
                self.bytes_in,
                self.stop,
                self.reason,
                self.text,
                self.original,
                keys,
            ],  # fmt: skip
            ensure_ascii=False,
        )

    @classmethod
    def from_json(cls, line: str) -> DocResult:
        source, id_, nbytes, stop, reason, text, original, keys = json.loads(line)
        decoded = [(i, None if k is None else base64.b64decode(k)) for i, k in keys]
        return cls(source, id_, nbytes, stop, reason, text, original, decoded)


def trace_document(doc: Document, steps: Sequence[Step]) -> DocResult:
    text = doc.text
    keys: list[tuple[int, bytes | None]] = []
    for i, step in enumerate(steps):
        if isinstance(step, ExactDedup | MinHashDedup):
            keys.append((i, step.key(text)))
            continue
        result = step(text)
        if not result.keep:
            reason = result.reason or step_name(step)
            return DocResult(
                doc.source, doc.id, len(doc.text.encode()), i, reason, "",
                doc.text[:SAMPLE_CHARS], keys,
            )  # fmt: skip
        if result.text is not None:
            text = result.text
    original = None if text == doc.text else doc.text[:SAMPLE_CHARS]
    return DocResult(
        doc.source, doc.id, len(doc.text.encode()), len(steps), None, text, original, keys
    )


@dataclass
class _Reservoir:
    """Up to k items per key, uniformly sampled, reproducible from the seed."""

    k: int
    rng: random.Random

    def __post_init__(self) -> None:
        self.items: dict[str, list[dict]] = defaultdict(list)
        self.seen: Counter[str] = Counter()

    def offer(self, key: str, item: Callable[[], dict]) -> None:
        self.seen[key] += 1
        slot = self.items[key]
        if len(slot) < self.k:
            slot.append(item())
        else:
            j = self.rng.randrange(self.seen[key])
            if j < self.k:
                slot[j] = item()


class Merger:
    """Takes traces in input order: dedup decisions, statistics, removal sample, kept output.

    The dedup steps in `steps` hold the index (they are the only state); filters are not called.
    """

    def __init__(
        self,
        steps: Sequence[Step],
        emit: Callable[[Document], None],
        sample_per_reason: int = 5,
        seed: int = 0,
    ):
        self.steps, self.emit = list(steps), emit
        self.names = [step_name(s) for s in self.steps]
        self.per_source: dict[str, Counter[str]] = defaultdict(Counter)
        self.removed: Counter[str] = Counter()
        self.removed_by_source: dict[str, Counter[str]] = defaultdict(Counter)
        self.step_in: Counter[str] = Counter()
        self.step_out: Counter[str] = Counter()
        self.reservoir = _Reservoir(sample_per_reason, random.Random(seed))

    def add(self, r: DocResult) -> None:
        counts = self.per_source[r.source]
        counts["docs_in"] += 1
        counts["bytes_in"] += r.bytes_in
        stop, reason = r.stop, r.reason
        for i, key in r.keys:
            if self.steps[i].seen_or_add(key):  # type: ignore[union-attr]
                stop, reason = i, self.names[i]
                break
        for k in range(min(stop + 1, len(self.steps))):
            self.step_in[self.names[k]] += 1
        for k in range(stop):
            self.step_out[self.names[k]] += 1
        if reason is None and not r.text.strip():
            reason = "empty_after_filters"
        if reason is not None:
            self.removed[reason] += 1
            self.removed_by_source[r.source][reason] += 1
            self.reservoir.offer(
                reason,
                lambda: {"reason": reason, "source": r.source, "id": r.id, "text": r.sample_text},
            )
            return
        counts["docs_out"] += 1
        counts["bytes_out"] += len(r.text.encode())
        self.emit(Document(r.text, r.source, r.id))

    def result(self) -> tuple[dict[str, Any], list[dict]]:
        keys = ("docs_in", "docs_out", "bytes_in", "bytes_out")
        stats = {
            "sources": {
                s: {k: c[k] for k in keys}
                | {"removed": dict(sorted(self.removed_by_source[s].items()))}
                for s, c in self.per_source.items()
            },
            "removed_by_reason": dict(sorted(self.removed.items(), key=lambda kv: (-kv[1], kv[0]))),
            "steps": {n: {"in": self.step_in[n], "kept": self.step_out[n]} for n in self.names},
            "docs_in": sum(c["docs_in"] for c in self.per_source.values()),
            "docs_out": sum(c["docs_out"] for c in self.per_source.values()),
        }
        items = self.reservoir.items
        sample = [item for key in sorted(items) for item in items[key]]
        return stats, sample
