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
import time
from collections.abc import Iterable
from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from crucible.data.corpora import Document
from crucible.data.dedup import ExactDedup, MinHashDedup
from crucible.data.filters import (
    C4Lines,
    FineWebQuality,
    GopherQuality,
    GopherRepetition,
    SpanRepeats,
)
from crucible.data.sources import SourceConfig, iter_sources
from crucible.data.trace import Merger, Step, step_name, trace_document

__all__ = ["Step", "build_step", "load_pipeline", "process_documents", "run_pipeline", "step_name"]

STEP_TYPES: dict[str, type] = {
    "gopher_quality": GopherQuality,
    "gopher_repetition": GopherRepetition,
    "c4": C4Lines,
    "fineweb_quality": FineWebQuality,
    "span_repeats": SpanRepeats,
    "exact_dedup": ExactDedup,
    "minhash_dedup": MinHashDedup,
}


class TokenizeSection(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tokenizer: str
    out: str
    workers: int | None = Field(None, ge=1, description="Default: `--workers`, else 1.")
    shard_tokens: int | None = Field(None, ge=1)


class SlurmSection(BaseModel):
    """`--executor slurm`: passed to datatrove's SlurmPipelineExecutor for every job."""

    model_config = ConfigDict(extra="forbid")
    partition: str
    time: str = Field("04:00:00", description="Slurm time limit per job (HH:MM:SS).")
    cpus_per_task: int = Field(1, ge=1)
    mem_per_cpu_gb: float = Field(2, gt=0)
    qos: str = "normal"
    job_name: str = Field("crucible-data", description="Prefix; each job appends its stage.")
    venv_path: str | None = Field(None, description="Virtualenv to activate on the nodes.")
    env_command: str | None = Field(None, description="Shell command run before each job.")
    sbatch_args: dict[str, str] = Field(default_factory=dict, description="Extra #SBATCH keys.")


class RaySection(BaseModel):
    model_config = ConfigDict(extra="forbid")
    address: str | None = Field(None, description="ray.init address; None: a local Ray.")
    cpus_per_task: int = Field(1, ge=1)


class DatatroveSection(BaseModel):
    """Settings of the datatrove executors (`--executor datatrove-local|slurm|ray`)."""

    model_config = ConfigDict(extra="forbid")
    work_dir: str | None = Field(None, description="Intermediate files; default OUTPUT/.datatrove.")
    slurm: SlurmSection | None = None
    ray: RaySection | None = None


class PipelineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sources: list[SourceConfig] = Field(min_length=1)
    steps: list[dict[str, dict[str, Any] | None]] = Field(default_factory=list)
    output: str
    sample_per_reason: int = Field(5, ge=0)
    seed: int = 0
    tokenize: TokenizeSection | None = None
    datatrove: DatatroveSection | None = None

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
    if cfg.datatrove and cfg.datatrove.work_dir and not os.path.isabs(cfg.datatrove.work_dir):
        cfg.datatrove.work_dir = str(base / cfg.datatrove.work_dir)
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
    return cls(**options)


def process_documents(
    docs: Iterable[Document], steps: list[Step], sample_per_reason: int = 5, seed: int = 0
) -> tuple[list[Document], dict[str, Any], list[dict]]:
    """Run `docs` through `steps` in memory; (kept, stats, removed sample)."""
    kept: list[Document] = []
    merger = Merger(steps, kept.append, sample_per_reason, seed)
    for doc in docs:
        merger.add(trace_document(doc, steps))
    stats, sample = merger.result()
    return kept, stats, sample


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

    def close(self, commit: bool = True) -> list[Path]:
        """Rename the finished files into place (`commit`), or delete them."""
        out = []
        for source, f in self.files.items():
            f.close()
            if not commit:
                self._tmp(source).unlink(missing_ok=True)
                continue
            final = self.out_dir / f"{source}.jsonl"
            os.replace(self._tmp(source), final)
            out.append(final)
        return out


def run_pipeline(
    cfg: PipelineConfig, show_progress: bool = True, workers: int | None = None
) -> dict[str, Any]:
    """Process all sources into `cfg.output`; returns the stats written to stats.json.

    `workers` None runs everything in this process; an int runs the filters on that many worker
    processes (`crucible.data.workers`) with the same output, and tokenizes with as many
    processes unless the pipeline's `tokenize.workers` says otherwise.
    """
    for src in cfg.sources:
        if "/" in src.name or src.name.startswith("."):
            raise ValueError(f"source name {src.name!r} must be a plain file name")
    if workers is not None and workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    names = [s.name for s in cfg.sources]
    if len(set(names)) != len(names):
        raise ValueError(f"source names must be unique, got {names}")
    steps = [build_step(name, opts) for step in cfg.steps for name, opts in step.items()]
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    writer = _JsonlOutputs(out)
    merger = Merger(steps, writer.emit, cfg.sample_per_reason, cfg.seed)
    ok = False
    try:
        if workers is None:
            for doc in _with_progress(iter_sources(cfg.sources), show_progress):
                merger.add(trace_document(doc, steps))
            run_info: dict[str, Any] = {"workers": None}
        else:
            from crucible.data.workers import plan_tasks, run_tasks

            run_info = run_tasks(plan_tasks(cfg.sources), cfg.steps, out, workers, merger.add)
        ok = True
    finally:
        files = writer.close(commit=ok)
    stats, sample = merger.result()
    for stale in out.glob("*.jsonl"):  # outputs of sources this run did not produce
        if stale not in files and stale.name != "removed_sample.jsonl":
            stale.unlink()
    stats["seconds"] = round(time.perf_counter() - start, 2)
    stats["run"] = run_info
    stats["outputs"] = [f.name for f in files]
    _write_text(out / "removed_sample.jsonl", "".join(
        json.dumps(item, ensure_ascii=False) + "\n" for item in sample
    ))  # fmt: skip
    _write_text(out / "stats.json", json.dumps(stats, indent=2) + "\n")
    if cfg.tokenize is not None:
        from crucible.data.tokenize import tokenize_jsonl_dir

        tok_workers = cfg.tokenize.workers or workers or 1
        stats["tokenize"] = tokenize_jsonl_dir(
            out,
            cfg.tokenize.tokenizer,
            cfg.tokenize.out,
            num_workers=tok_workers,
            shard_tokens=cfg.tokenize.shard_tokens,
            show_progress=show_progress,
        )
        _write_text(out / "stats.json", json.dumps(stats, indent=2) + "\n")
    return stats


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


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
