"""`data process` scaling: documents/s of the single-process path and of 1, 2, 4 worker processes.

One run, one corpus: the embedded stdlib corpus (train split, `--mb` of it) cut into `--files`
JSONL files (a task per file), through every filter and both dedup steps. Each configuration is
run `--repeats` times, alternating, and the best time is kept; a time covers the whole
`run_pipeline` call (worker start-up, traces, merge, writing the outputs). The outputs of every
configuration are checked to be byte-identical. `uptime` is printed before and after: the load
of a shared machine decides what the wall-clock ratios mean. CPU seconds (this process and its
reaped children, `getrusage`) are printed too: they show what the parallel path costs in work,
which load does not change.

    .venv/bin/python bench/data_process_scaling.py --mb 4 --workers 1 2 4 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import tempfile
import time
from pathlib import Path

from crucible.data.corpora import iter_stdlib_documents
from crucible.data.pipeline import PipelineConfig, run_pipeline

STEPS = [
    {"span_repeats": {}},
    {"gopher_repetition": {}},
    {"gopher_quality": {}},
    {"c4": {"filter_no_terminal_punct": False}},
    {"fineweb_quality": {}},
    {"exact_dedup": {}},
    {"minhash_dedup": {}},
]


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return f"loadavg {os.getloadavg()}"


def write_corpus(root: Path, mb: float, files: int) -> tuple[int, int]:
    docs = list(iter_stdlib_documents("train", int(mb * 1e6)))
    for f in range(files):  # round-robin: files of similar size
        lines = (json.dumps({"text": d.text, "id": d.id}) + "\n" for d in docs[f::files])
        (root / f"part{f:03d}.jsonl").write_text("".join(lines), encoding="utf-8")
    return len(docs), sum(len(d.text.encode()) for d in docs)


def cpu_seconds() -> float:
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        r = resource.getrusage(who)
        total += r.ru_utime + r.ru_stime
    return total


def run_once(root: Path, out: str, workers: int | None) -> tuple[float, float, dict]:
    cfg = PipelineConfig(
        sources=[{"name": "stdlib", "kind": "jsonl", "paths": [str(root)], "id_field": "id"}],
        steps=STEPS,
        output=str(root.parent / out),
    )
    start, cpu = time.perf_counter(), cpu_seconds()
    stats = run_pipeline(cfg, show_progress=False, workers=workers)
    return time.perf_counter() - start, cpu_seconds() - cpu, stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--mb", type=float, default=4.0, help="MB of stdlib text")
    ap.add_argument("--files", type=int, default=16, help="JSONL files (tasks)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", help="write the raw results here")
    args = ap.parse_args()

    before = uptime()
    print(f"uptime before: {before}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "in"
        root.mkdir()
        n_docs, n_bytes = write_corpus(root, args.mb, args.files)
        print(f"{n_docs} documents, {n_bytes / 1e6:.2f} MB in {args.files} files, "
              f"{os.cpu_count()} CPUs, {len(STEPS)} steps")  # fmt: skip
        configs: list[tuple[str, int | None]] = [("single process", None)]
        configs += [(f"{w} worker{'s' * (w > 1)}", w) for w in args.workers]
        best: dict[str, float] = {}
        best_cpu: dict[str, float] = {}
        outputs: dict[str, bytes] = {}
        for _ in range(args.repeats):
            for name, workers in configs:
                out = name.replace(" ", "_")
                seconds, cpu, stats = run_once(root, out, workers)
                best[name] = min(best.get(name, float("inf")), seconds)
                best_cpu[name] = min(best_cpu.get(name, float("inf")), cpu)
                data = b"".join(
                    (root.parent / out / f).read_bytes()
                    for f in ("stdlib.jsonl", "removed_sample.jsonl")
                )
                outputs.setdefault(name, data)
                assert outputs[name] == data
                kept = stats["docs_out"]
        identical = len(set(outputs.values())) == 1
    after = uptime()
    base = best["single process"]
    one = best.get("1 worker")
    rows = []
    head = f"{'path':<16} {'seconds':>8} {'docs/s':>9} {'vs single':>10} {'vs 1 worker':>12}"
    print(f"\n{head} {'CPU s':>7}")
    for name, _ in configs:
        s, c = best[name], best_cpu[name]
        vs_one = f"{one / s:.2f}x" if one else "-"
        print(f"{name:<16} {s:>8.2f} {n_docs / s:>9.1f} {base / s:>9.2f}x {vs_one:>12} {c:>7.2f}")
        rows.append({"path": name, "seconds": s, "cpu_seconds": c, "docs_per_s": n_docs / s,
                     "vs_single": base / s} | ({"vs_1_worker": one / s} if one else {}))  # fmt: skip
    print(f"\nkept {kept} of {n_docs} documents; outputs identical across paths: {identical}")
    if one and "2 workers" in best:
        print(f"2 workers / 1 worker: {one / best['2 workers']:.2f}x (target >= 1.7x on 2 cores)")
    print(f"uptime after: {after}")
    if args.json:
        record = {
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.processor()}",
            "python": platform.python_version(),
            "args": vars(args),
            "docs": n_docs,
            "bytes": n_bytes,
            "kept": kept,
            "identical_outputs": identical,
            "uptime_before": before,
            "uptime_after": after,
            "rows": rows,
        }
        Path(args.json).write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
