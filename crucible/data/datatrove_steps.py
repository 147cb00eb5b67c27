"""Crucible's reader, filters, counters and writer as datatrove pipeline steps.

`crucible.data.datatrove_run` chains them into datatrove jobs. Every step keeps exact integer
counters and writes them, at the end of its rank, to ``WORK/counts/<job>/<rank>.<step>.json``
(one file per rank and step, overwritten when datatrove reruns the rank), so summing the files of
all ranks gives exact totals; `gather` turns them into the ``stats.json`` of the local path. A
failure names the input file and the record (and the document id and step) it happened on.

Importing this module needs datatrove (``pip install datatrove``); nothing else here does.
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from datatrove.data import Document as DTDocument
from datatrove.data import DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.utils.word_tokenizers import WordTokenizer

from crucible.data.dedup import simplify_text
from crucible.data.sources import SourceConfig, iter_source
from crucible.data.trace import SAMPLE_CHARS, _Reservoir


class RecordError(ValueError):
    """A step failed on one record: the message names the file, the record and the error."""


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, ensure_ascii=False))
    os.replace(tmp, path)


def _where(doc: DTDocument) -> str:
    return f"{doc.metadata.get('input')}, record {doc.metadata.get('record')} (id {doc.id})"


class _Counted(PipelineStep):
    """A step that saves exact counters (and an optional removal sample) per rank."""

    type = "🔢 - CRUCIBLE"

    def __init__(self, work_dir: str, job: str, index: int):
        super().__init__()
        self.work_dir, self.job, self.index = work_dir, job, index

    def _save(self, rank: int, counts: Counter[str], sample: list[dict] | None = None) -> None:
        path = Path(self.work_dir) / "counts" / self.job / f"{rank:05d}.{self.index:02d}.json"
        _write_json(path, {"counts": dict(counts), "sample": sample or []})


class CrucibleReader(_Counted):
    """Reads the documents of the tasks of this rank (`crucible.data.workers.plan_tasks`:
    one per input file), with the same ids as `iter_sources`."""

    name = "crucible reader"

    def __init__(self, tasks: list[dict[str, Any]], work_dir: str, job: str, index: int = 0):
        super().__init__(work_dir, job, index)
        self.tasks = tasks

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1):
        counts: Counter[str] = Counter()
        for task in self.tasks[rank::world_size]:
            where = task["file"] or f"source {task['source']['name']!r}"
            n = 0
            docs = iter_source(SourceConfig(**task["source"]))
            while True:
                try:
                    doc = next(docs, None)
                except Exception as e:
                    raise RecordError(f"{where}, record {n + 1}: {type(e).__name__}: {e}") from e
                if doc is None:
                    break
                n += 1
                counts[f"docs_in|{doc.source}"] += 1
                counts[f"bytes_in|{doc.source}"] += len(doc.text.encode())
                self.stat_update("documents")
                meta = {"source": doc.source, "input": where, "record": n}
                yield DTDocument(text=doc.text, id=doc.id, metadata=meta)
        self._save(rank, counts)


class CrucibleFilter(_Counted):
    """One Crucible filter (`build_step(name, options)`): counts in / kept / removed by source
    and reason, and keeps a seeded sample of removals."""

    def __init__(
        self,
        step: str,
        options: dict[str, Any] | None,
        work_dir: str,
        job: str,
        index: int,
        sample_per_reason: int = 5,
        seed: int = 0,
    ):
        super().__init__(work_dir, job, index)
        self.step, self.options = step, dict(options or {})
        self.sample_per_reason, self.seed = sample_per_reason, seed
        self.name = f"crucible {step}"

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1):
        from crucible.data.pipeline import build_step

        step = build_step(self.step, self.options)
        counts: Counter[str] = Counter()
        reservoir = _Reservoir(self.sample_per_reason, random.Random(self.seed * 1_000_003 + rank))
        for doc in data:
            counts["in"] += 1
            try:
                result = step(doc.text)  # type: ignore[operator]
            except Exception as e:
                raise RecordError(
                    f"{_where(doc)}: step {self.step}: {type(e).__name__}: {e}"
                ) from e
            source = doc.metadata["source"]
            if not result.keep:
                reason = result.reason or self.step
                counts[f"removed|{source}|{reason}"] += 1
                self.stat_update(reason)
                original = doc.metadata.get("original", doc.text[:SAMPLE_CHARS])
                item = {"reason": reason, "source": source, "id": doc.id, "text": original}
                reservoir.offer(reason, lambda item=item: item)
                continue
            counts["kept"] += 1
            self.stat_update("kept")
            if result.text is not None and result.text != doc.text:
                doc.metadata.setdefault("original", doc.text[:SAMPLE_CHARS])
                doc.text = result.text
            yield doc
        sample = [x for key in sorted(reservoir.items) for x in reservoir.items[key]]
        self._save(rank, counts, sample)


class CrucibleCount(_Counted):
    """Counts documents per source as they pass (around datatrove's MinHash filter)."""

    name = "crucible count"

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1):
        counts: Counter[str] = Counter()
        for doc in data:
            counts[doc.metadata["source"]] += 1
            yield doc
        self._save(rank, counts)


class CrucibleWriter(_Counted):
    """Writes ``DIR/<rank>.jsonl`` (id, source, text and our metadata), always, even empty, so
    that rank r of a later job reads exactly the file of rank r. Drops empty texts."""

    name = "crucible writer"

    def __init__(self, out_dir: str, work_dir: str, job: str, index: int, final: bool):
        super().__init__(work_dir, job, index)
        self.out_dir, self.final = out_dir, final

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1):
        counts: Counter[str] = Counter()
        path = Path(self.out_dir) / f"{rank:05d}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        with open(tmp, "w", encoding="utf-8") as f:
            for doc in data:
                source = doc.metadata["source"]
                if not doc.text.strip():
                    counts[f"removed|{source}|empty_after_filters"] += 1
                    continue
                if self.final:
                    counts[f"docs_out|{source}"] += 1
                    counts[f"bytes_out|{source}"] += len(doc.text.encode())
                meta = {k: doc.metadata[k] for k in ("source", "input", "record", "original")
                        if k in doc.metadata}  # fmt: skip
                f.write(json.dumps({"id": doc.id, "text": doc.text, "meta": meta}) + "\n")
        os.replace(tmp, path)
        self._save(rank, counts)
        yield from ()


class CrucibleJsonlReader(PipelineStep):
    """Reads ``DIR/<rank>.jsonl`` written by `CrucibleWriter` of an earlier job."""

    name = "crucible part reader"
    type = "📖 - READER"

    def __init__(self, in_dir: str):
        super().__init__()
        self.in_dir = in_dir

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1):
        path = Path(self.in_dir) / f"{rank:05d}.jsonl"
        with open(path, encoding="utf-8") as f:
            for line in f:
                r = json.loads(line)
                yield DTDocument(text=r["text"], id=r["id"], metadata=r["meta"])


class CrucibleWords(WordTokenizer):
    """MinHash shingles from our `simplify_text` split on spaces: no NLTK, no download."""

    def __init__(self) -> None:
        super().__init__("crucible")

    def word_tokenize(self, text: str) -> list[str]:
        return simplify_text(text).split()

    def sent_tokenize(self, text: str) -> list[str]:
        return [text]

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        return [(0, len(text))]


def read_parts(part_dir: Path, ranks: int) -> Iterator[dict]:
    for rank in range(ranks):
        with open(part_dir / f"{rank:05d}.jsonl", encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)


class CrucibleGather(PipelineStep):
    """The last job (one task): `crucible.data.datatrove_run.gather`."""

    name = "crucible gather"
    type = "📦 - CRUCIBLE"

    def __init__(self, spec: dict[str, Any]):
        super().__init__()
        self.spec = spec

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1):
        from crucible.data.datatrove_run import gather

        gather(self.spec)
        yield from ()


class SampleWriter:
    """`exclusion_writer` for datatrove's MinHash filter: keeps the first `k` removed documents
    of each rank in ``DIR/<rank>.jsonl`` (a sample, not all of them)."""

    def __init__(self, out_dir: str, k: int):
        self.out_dir, self.k = out_dir, k
        self._items: dict[int, list[dict]] = {}

    def __enter__(self) -> SampleWriter:
        self._items = {}
        return self

    def write(self, doc: DTDocument, rank: int = 0, **_: Any) -> None:
        items = self._items.setdefault(rank, [])
        if len(items) < self.k:
            meta = doc.metadata
            text = meta.get("original", doc.text[:SAMPLE_CHARS])
            items.append({"source": meta.get("source"), "id": doc.id, "text": text})

    def __exit__(self, *exc: object) -> None:
        for rank, items in self._items.items():
            _write_json(Path(self.out_dir) / f"{rank:05d}.json", items)
