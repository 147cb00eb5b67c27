"""`data process --workers N`: the filters on N local processes, one merge in input order.

The input is cut into tasks: one per file of a file-based source (text, JSONL, Parquet), one per
whole source otherwise (HF streaming, stdlib, or any source with `max_docs`). A worker runs the
filters of a task and writes its traces (`crucible.data.trace`) to
``OUTPUT/.parts/task-NNNNN.jsonl``; the main process merges the tasks' traces in task order as
they complete, so dedup decisions, statistics and the removal sample are exactly those of one
process, and so are the output files.

Completion markers: a finished task also writes ``task-NNNNN.done`` holding a fingerprint of
its input (the source's settings, the file's path, size and mtime) and of the steps. When a task
fails, the others still finish and keep their parts; the run then stops with the failing file,
record and error, writing no output. A rerun skips every task whose marker matches and redoes only
the rest. After a complete merge ``.parts`` is removed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing
import os
import shutil
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crucible.data.sources import FILE_SUFFIXES, SourceConfig, expand_paths, iter_source
from crucible.data.trace import DocResult, Step, trace_document

PARTS_DIR = ".parts"
MARKER_VERSION = 1


class WorkerError(ValueError):
    """A task failed; the message names the file, the record and the error."""


@dataclass(frozen=True)
class Task:
    index: int
    source: dict[str, Any]  # SourceConfig fields; `paths` narrowed to this task's file
    file: str | None  # None: the whole source

    @property
    def name(self) -> str:
        return f"task-{self.index:05d}"

    def where(self) -> str:
        return self.file or f"source {self.source['name']!r}"


def plan_tasks(sources: list[SourceConfig]) -> list[Task]:
    """Tasks in input order: concatenating their documents gives `iter_sources` exactly."""
    tasks: list[Task] = []
    for src in sources:
        spec = src.model_dump()
        if src.kind in FILE_SUFFIXES and src.max_docs is None:
            if not src.paths:
                raise ValueError(f"source {src.name!r}: kind {src.kind} needs `paths`")
            for path in expand_paths(src.paths, FILE_SUFFIXES[src.kind]):
                tasks.append(Task(len(tasks), spec | {"paths": [str(path)]}, str(path)))
        else:
            tasks.append(Task(len(tasks), spec, None))
    return tasks


def fingerprint(task: Task, steps_spec: list[dict[str, Any]]) -> str:
    """Changes when the task's input or the steps change (what a completion marker vouches for)."""
    stat = os.stat(task.file) if task.file else None
    data = {
        "version": MARKER_VERSION,
        "source": task.source,
        "file": [task.file, stat.st_size, stat.st_mtime_ns] if stat else None,
        "steps": steps_spec,
    }
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def is_complete(parts: Path, task: Task, fp: str) -> bool:
    marker = parts / f"{task.name}.done"
    if not marker.is_file() or not (parts / f"{task.name}.jsonl").is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("fingerprint") == fp
    except (OSError, ValueError):
        return False


# ----------------------------------------------------------------------------- worker side

_steps_cache: dict[str, list[Step]] = {}


def _steps(steps_spec: list[dict[str, Any]]) -> list[Step]:
    from crucible.data.pipeline import build_step  # the worker builds its own steps

    key = json.dumps(steps_spec, sort_keys=True)
    if key not in _steps_cache:
        _steps_cache[key] = [build_step(n, o) for st in steps_spec for n, o in st.items()]
    return _steps_cache[key]


def run_task(task: Task, steps_spec: list[dict[str, Any]], parts: str, fp: str) -> dict[str, Any]:
    """Trace one task's documents into its part file; never raises (errors come back as data)."""
    out = Path(parts) / f"{task.name}.jsonl"
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    n, doc_id = 0, None
    try:
        steps = _steps(steps_spec)
        with open(tmp, "w", encoding="utf-8") as f:
            for doc in iter_source(SourceConfig(**task.source)):
                n, doc_id = n + 1, doc.id
                f.write(trace_document(doc, steps).to_json() + "\n")
                doc_id = None
        os.replace(tmp, out)
        marker = out.with_name(f"{task.name}.done")
        marker_tmp = marker.with_name(f".{marker.name}.tmp-{os.getpid()}")
        marker_tmp.write_text(json.dumps({"fingerprint": fp, "docs": n, "input": task.where()}))
        os.replace(marker_tmp, marker)
        return {"index": task.index, "docs": n}
    except Exception as e:  # noqa: BLE001 - reported with its file and record, see merge
        tmp.unlink(missing_ok=True)
        # A step failed on document n, or the reader failed on the record after it.
        record = f"record {n} (id {doc_id})" if doc_id is not None else f"record {n + 1}"
        return {
            "index": task.index,
            "error": f"{task.where()}, {record}: {type(e).__name__}: {e}",
            "traceback": traceback.format_exc(),
        }


def _run_task_args(args: tuple) -> dict[str, Any]:
    return run_task(*args)


# ----------------------------------------------------------------------------- main side


def _read_part(path: Path) -> Iterator[DocResult]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield DocResult.from_json(line)


def run_tasks(
    tasks: list[Task],
    steps_spec: list[dict[str, Any]],
    out_dir: Path,
    workers: int,
    merge: Callable[[DocResult], None],
) -> dict[str, Any]:
    """Run the incomplete tasks on `workers` processes and feed every task's traces to `merge`,
    in task order. Raises `WorkerError` (after all tasks ran) when any task failed."""
    parts = out_dir / PARTS_DIR
    parts.mkdir(parents=True, exist_ok=True)
    fps = [fingerprint(t, steps_spec) for t in tasks]
    todo = [t for t, fp in zip(tasks, fps) if not is_complete(parts, t, fp)]
    errors: list[str] = []
    # spawn: a fresh interpreter per worker (no forked locks or Rust thread pools).
    ctx = multiprocessing.get_context("spawn")
    with contextlib.ExitStack() as stack:
        results: Iterator[dict[str, Any]] = iter(())
        if todo:
            pool = stack.enter_context(ctx.Pool(min(workers, len(todo))))
            args = [(t, steps_spec, str(parts), fps[t.index]) for t in todo]
            results = pool.imap(_run_task_args, args)  # in task order, computed ahead
        pending = {t.index for t in todo}
        for task in tasks:
            if task.index in pending:
                res = next(results)
                if "error" in res:
                    errors.append(res["error"])
            if not errors:  # merge as tasks complete; after a failure only wait for the rest
                for r in _read_part(parts / f"{task.name}.jsonl"):
                    merge(r)
    if errors:
        done = len(tasks) - len(errors)
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise WorkerError(
            f"a worker failed on {errors[0]}{more}; {done} of {len(tasks)} tasks are complete "
            f"and kept in {parts}; fix the input and rerun: only the failed tasks run again"
        )
    shutil.rmtree(parts)
    return {"tasks": len(tasks), "tasks_run": len(todo), "workers": workers}
