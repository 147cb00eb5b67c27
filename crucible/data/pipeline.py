"""`crucible data process pipeline.yaml`: sources -> filters -> dedup -> JSONL per source.

A pipeline file names sources, an ordered list of steps (each a one-key mapping from step name
to its options), and an output directory. Every document runs through the steps in order until
one removes it; each removal is counted under its reason (``step:rule``) and a seeded reservoir
keeps up to `sample_per_reason` removed documents per reason for inspection. Output:

* ``OUTPUT/<source>.jsonl``: kept documents, ``{"id", "source", "text"}`` per line;
* ``OUTPUT/stats.json``: documents and bytes in/out per source, removals by reason and step;
* ``OUTPUT/removed_sample.jsonl``: the sampled removals with their reason.

An optional ``tokenize`` section then writes per-source shards (see `crucible.data.tokenize`).
"""

from __future__ import annotations

import json
import os
import random
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from crucible.data.corpora import Document
from crucible.data.dedup import ExactDedup, MinHashDedup
from crucible.data.filters import (
    C4Lines,
    FilterResult,
    FineWebQuality,
    GopherQuality,
    GopherRepetition,
    SpanRepeats,
)
from crucible.data.sources import SourceConfig, iter_sources

STEP_TYPES: dict[str, type] = {
    "gopher_quality": GopherQuality,
    "gopher_repetition": GopherRepetition,
    "c4": C4Lines,
    "fineweb_quality": FineWebQuality,
    "span_repeats": SpanRepeats,
    "exact_dedup": ExactDedup,
    "minhash_dedup": MinHashDedup,
}
SAMPLE_CHARS = 2000  # removed texts are cut to this in the sample file


class TokenizeSection(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tokenizer: str
    out: str
    workers: int = Field(1, ge=1)
    shard_tokens: int | None = Field(None, ge=1)


class PipelineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sources: list[SourceConfig] = Field(min_length=1)
    steps: list[dict[str, dict[str, Any] | None]] = Field(default_factory=list)
    output: str
    sample_per_reason: int = Field(5, ge=0)
    seed: int = 0
    tokenize: TokenizeSection | None = None

    @field_validator("steps")
    @classmethod
    def _one_key(cls, steps: list[dict]) -> list[dict]:
        for i, step in enumerate(steps):
            if len(step) != 1:
                raise ValueError(f"step {i} must be a one-key mapping, e.g. `- c4: {{}}`")
            (name,) = step
            if name not in (*STEP_TYPES, "language"):
                known = ", ".join([*STEP_TYPES, "language"])
                raise ValueError(f"step {i}: unknown step {name!r} (known: {known})")
        return steps


def load_pipeline(path: str | os.PathLike[str]) -> PipelineConfig:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"pipeline file not found: {p}")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise ValueError(f"{p}{where}: invalid YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{p}: expected a mapping with sources:, steps: and output:")
    try:
        cfg = PipelineConfig.model_validate(raw)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(map(str, x['loc'])) or '(top level)'}: {x['msg']}" for x in e.errors()
        )
        raise ValueError(f"{p}: {problems}") from None
    # Relative paths are relative to the pipeline file, not the working directory.
    base = p.parent
    for src in cfg.sources:
        src.paths = [x if os.path.isabs(x) else str(base / x) for x in src.paths]
    if not os.path.isabs(cfg.output):
        cfg.output = str(base / cfg.output)
    if cfg.tokenize:
        for key in ("tokenizer", "out"):
            value = getattr(cfg.tokenize, key)
            if not os.path.isabs(value):
                setattr(cfg.tokenize, key, str(base / value))
    _check_output(cfg, p)
    return cfg


def _check_output(cfg: PipelineConfig, path: Path) -> None:
    """The output may not hold the inputs, nor be a folder of someone else's JSONL files."""
    out = Path(cfg.output).resolve()
    for src in cfg.sources:
        for spec in src.paths:
            fixed = Path(spec.split("*")[0].split("?")[0].split("[")[0])
            folder = (fixed if fixed.is_dir() else fixed.parent).resolve()
            if folder.is_relative_to(out):
                raise ValueError(
                    f"{path}: output {cfg.output} holds the input {spec} of source "
                    f"{src.name!r}; write the output to another folder"
                )
    if out.is_dir() and any(out.glob("*.jsonl")) and not (out / "stats.json").is_file():
        raise ValueError(
            f"{path}: output {cfg.output} holds .jsonl files that no pipeline wrote (no "
            "stats.json); choose an empty or new folder (nothing was deleted)"
        )


Step = Callable[[str], FilterResult]


def _dedup_step(dedup: ExactDedup | MinHashDedup) -> Step:
    def step(text: str) -> FilterResult:
        return FilterResult(False, dedup.name) if dedup.is_duplicate(text) else FilterResult(True)

    step.name = dedup.name  # type: ignore[attr-defined]
    return step


def build_step(name: str, options: dict[str, Any] | None) -> Step:
    options = dict(options or {})
    if name == "language":
        from crucible.data.langid import LanguageFilter  # optional back-end

        langs = options.pop("languages", None)
        if not langs:
            raise ValueError("step language: set `languages`, e.g. [en, fr]")
        return LanguageFilter(tuple(langs), **options)
    cls = STEP_TYPES[name]
    allowed = {f.name for f in fields(cls) if not f.name.startswith("_") and f.name != "name"}
    unknown = set(options) - allowed
    if unknown:
        raise ValueError(
            f"step {name}: unknown option(s) {sorted(unknown)}; known: {sorted(allowed)}"
        )
    # YAML lists -> tuples, as the dataclass defaults are (hashable, immutable thresholds).
    options = {
        k: tuple(tuple(x) if isinstance(x, list) else x for x in v) if isinstance(v, list) else v
        for k, v in options.items()
    }
    obj = cls(**options)
    return _dedup_step(obj) if isinstance(obj, ExactDedup | MinHashDedup) else obj


def step_name(step: Step) -> str:
    return getattr(step, "name", type(step).__name__)


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


def process_documents(
    docs: Iterable[Document], steps: list[Step], sample_per_reason: int = 5, seed: int = 0
) -> tuple[list[Document], dict[str, Any], list[dict]]:
    """Run `docs` through `steps` in memory; (kept, stats, removed sample). Used by tests and
    by `run_pipeline` (which streams kept documents to disk instead)."""
    kept: list[Document] = []
    stats, sample = _process(docs, steps, kept.append, sample_per_reason, seed)
    return kept, stats, sample


def _process(
    docs: Iterable[Document],
    steps: list[Step],
    emit: Callable[[Document], None],
    sample_per_reason: int,
    seed: int,
) -> tuple[dict[str, Any], list[dict]]:
    per_source: dict[str, Counter[str]] = defaultdict(Counter)
    removed: Counter[str] = Counter()
    removed_by_source: dict[str, Counter[str]] = defaultdict(Counter)
    step_in: Counter[str] = Counter()
    step_out: Counter[str] = Counter()
    reservoir = _Reservoir(sample_per_reason, random.Random(seed))
    for doc in docs:
        counts = per_source[doc.source]
        counts["docs_in"] += 1
        counts["bytes_in"] += len(doc.text.encode())
        text, reason = doc.text, None
        for step in steps:
            name = step_name(step)
            step_in[name] += 1
            result = step(text)
            if not result.keep:
                reason = result.reason or name
                break
            step_out[name] += 1
            if result.text is not None:
                text = result.text
        if reason is None and not text.strip():
            reason = "empty_after_filters"
        if reason is not None:
            removed[reason] += 1
            removed_by_source[doc.source][reason] += 1
            reservoir.offer(
                reason,
                lambda d=doc, r=reason: {
                    "reason": r,
                    "source": d.source,
                    "id": d.id,
                    "text": d.text[:SAMPLE_CHARS],
                },
            )
            continue
        counts["docs_out"] += 1
        counts["bytes_out"] += len(text.encode())
        emit(Document(text, doc.source, doc.id))
    stats = {
        "sources": {
            s: {k: c[k] for k in ("docs_in", "docs_out", "bytes_in", "bytes_out")}
            | {"removed": dict(sorted(removed_by_source[s].items()))}
            for s, c in per_source.items()
        },
        "removed_by_reason": dict(sorted(removed.items(), key=lambda kv: (-kv[1], kv[0]))),
        "steps": {
            step_name(s): {"in": step_in[step_name(s)], "kept": step_out[step_name(s)]}
            for s in steps
        },
        "docs_in": sum(c["docs_in"] for c in per_source.values()),
        "docs_out": sum(c["docs_out"] for c in per_source.values()),
    }
    sample = [item for key in sorted(reservoir.items) for item in reservoir.items[key]]
    return stats, sample


class _JsonlOutputs:
    """One JSONL file per source, written under temporary names and renamed when complete."""

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self.files: dict[str, Any] = {}

    def _tmp(self, source: str) -> Path:
        return self.out_dir / f".{source}.jsonl.tmp-{os.getpid()}"

    def emit(self, doc: Document) -> None:
        f = self.files.get(doc.source)
        if f is None:
            f = open(self._tmp(doc.source), "w", encoding="utf-8")  # noqa: SIM115 - see close()
            self.files[doc.source] = f
        f.write(json.dumps({"id": doc.id, "source": doc.source, "text": doc.text}) + "\n")

    def close(self) -> list[Path]:
        out = []
        for source, f in self.files.items():
            f.close()
            final = self.out_dir / f"{source}.jsonl"
            os.replace(self._tmp(source), final)
            out.append(final)
        return out


def run_pipeline(cfg: PipelineConfig, show_progress: bool = True) -> dict[str, Any]:
    """Process all sources into `cfg.output`; returns the stats written to stats.json."""
    for src in cfg.sources:
        if "/" in src.name or src.name.startswith("."):
            raise ValueError(f"source name {src.name!r} must be a plain file name")
    steps = [build_step(name, opts) for step in cfg.steps for name, opts in step.items()]
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("*.jsonl"):
        stale.unlink()
    start = time.perf_counter()
    writer = _JsonlOutputs(out)
    try:
        stats, sample = _process(
            _with_progress(iter_sources(cfg.sources), show_progress),
            steps,
            writer.emit,
            cfg.sample_per_reason,
            cfg.seed,
        )
    finally:
        files = writer.close()
    stats["seconds"] = round(time.perf_counter() - start, 2)
    stats["outputs"] = [f.name for f in files]
    with open(out / "removed_sample.jsonl", "w", encoding="utf-8") as f:
        for item in sample:
            f.write(json.dumps(item, ensure_ascii=False) + "\n")
    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    if cfg.tokenize is not None:
        from crucible.data.tokenize import tokenize_jsonl_dir

        stats["tokenize"] = tokenize_jsonl_dir(
            out,
            cfg.tokenize.tokenizer,
            cfg.tokenize.out,
            num_workers=cfg.tokenize.workers,
            shard_tokens=cfg.tokenize.shard_tokens,
            show_progress=show_progress,
        )
        (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    return stats


def _with_progress(docs: Iterable[Document], show: bool) -> Iterable[Document]:
    if not show:
        yield from docs
        return
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    cols = [SpinnerColumn(), TextColumn("processing {task.completed} docs"), TimeElapsedColumn()]
    with Progress(*cols, transient=True) as progress:
        task = progress.add_task("process")
        for doc in docs:
            yield doc
            progress.advance(task)
