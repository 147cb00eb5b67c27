"""`data process --executor datatrove-local|slurm|ray`: the same pipeline file on datatrove.

Jobs, chained with datatrove's ``depends`` (each a datatrove executor with its own logging
directory and completion markers under ``WORK/logs/<job>``):

1. ``filter`` (one task per input file, `workers` at a time): `CrucibleReader` -> the filters
   before ``minhash_dedup``, each a `CrucibleFilter` -> `CrucibleWriter`.
2. With ``minhash_dedup``: datatrove's disk-based MinHash with our parameters (5-gram shingles of
   our simplified text, 14 bands x 8 hashes, seed 1; no NLTK): ``mh-sigs`` (signatures, one task
   per file), ``mh-buckets`` (one task per band), ``mh-cluster`` (one task), and ``mh-filter``
   (drops all but one document per cluster, then runs the steps after ``minhash_dedup``).
3. ``gather`` (one task): the kept documents in input order into ``OUTPUT/<source>.jsonl``, exact
   statistics summed from every rank's counters into ``stats.json``, removal samples, and the
   optional ``tokenize`` section.

Without ``minhash_dedup`` the output is the local path's, byte for byte. With it, datatrove keeps
one document per cluster (the root of its union-find, not necessarily the first), and
``exact_dedup`` is not available (it needs one index over the whole stream: use the local
executor). A rerun of the same pipeline file skips every completed task (datatrove's markers); a
changed pipeline file starts over. After a complete local or Ray run ``WORK`` is removed.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from crucible.config import ConfigError
from crucible.data.pipeline import PipelineConfig, _JsonlOutputs, _write_text, build_step
from crucible.data.trace import step_name
from crucible.data.workers import WorkerError, plan_tasks

EXECUTORS = ("local", "datatrove-local", "slurm", "ray")
READER, COUNT_IN, COUNT_OUT, WRITER, FINAL_WRITER = 0, 80, 81, 90, 91


def check_executor(cfg: PipelineConfig, executor: str) -> None:
    """Everything that can be wrong before any work: executor, its packages, the steps."""
    if executor not in EXECUTORS:
        raise ConfigError(f"--executor {executor!r}: allowed: {', '.join(EXECUTORS)}")
    if executor == "local":
        return
    try:
        import datatrove  # noqa: F401
    except ImportError:
        raise ConfigError(
            f"--executor {executor}: datatrove is not installed (pip install 'datatrove>=0.10')"
        ) from None
    if executor == "slurm":
        if shutil.which("sbatch") is None:
            raise ConfigError(
                "--executor slurm: `sbatch` is not on PATH (run on a Slurm login node)"
            )
        if cfg.datatrove is None or cfg.datatrove.slurm is None:
            raise ConfigError(
                "--executor slurm: set datatrove.slurm.partition in the pipeline file"
            )
    if executor == "ray":
        try:
            import ray  # noqa: F401
        except ImportError:
            raise ConfigError("--executor ray: Ray is not installed (pip install ray)") from None
    names = [name for step in cfg.steps for name in step]
    for name in names:
        if name == "exact_dedup":
            raise ConfigError(
                f"step exact_dedup is not available with --executor {executor} (one index over "
                "the whole stream); use minhash_dedup (datatrove's disk-based stages) there, or "
                "--executor local"
            )
    if names.count("minhash_dedup") > 1:
        raise ConfigError(f"--executor {executor}: at most one minhash_dedup step")
    for step in cfg.steps:  # options checked now, not on a cluster node later
        for name, options in step.items():
            build_step(name, options)


def _minhash_config(options: dict[str, Any] | None):
    from datatrove.pipeline.dedup.minhash import MinhashConfig
    from datatrove.utils.hashing import HashConfig

    from crucible.data.dedup import MinHashDedup

    opts = MinHashDedup(**(options or {}))  # our defaults and validation: 5, 14, 8, seed 1
    # sha1, not datatrove's default xxhash: xxhash 4 (our pin) no longer hashes str.
    return MinhashConfig(
        n_grams=opts.n_grams,
        num_buckets=opts.bands,
        hashes_per_bucket=opts.rows,
        seed=opts.seed,
        hash_config=HashConfig(precision=64, hash_fc="sha1"),
    )


def build_jobs(cfg: PipelineConfig, executor: str, workers: int, work: Path) -> list[tuple]:
    """[(job name, pipeline, tasks)] in dependency order."""
    from datatrove.pipeline.dedup.minhash import (
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )

    from crucible.data.datatrove_steps import (
        CrucibleCount,
        CrucibleFilter,
        CrucibleGather,
        CrucibleJsonlReader,
        CrucibleReader,
        CrucibleWords,
        CrucibleWriter,
        SampleWriter,
    )

    w = str(work)
    tasks = [t.__dict__ for t in plan_tasks(cfg.sources)]
    steps = [(i, name, opts) for i, st in enumerate(cfg.steps) for name, opts in st.items()]
    cut = next((i for i, name, _ in steps if name == "minhash_dedup"), None)
    pre = steps if cut is None else steps[:cut]
    post = [] if cut is None else steps[cut + 1 :]

    def filters(part: list[tuple], job: str) -> list:
        return [
            CrucibleFilter(name, opts, w, job, i + 1, cfg.sample_per_reason, cfg.seed)
            for i, name, opts in part
        ]

    n = len(tasks)
    stage1 = f"{w}/stage1" if cut is not None else f"{w}/final"
    jobs = [
        (
            "filter",
            [
                CrucibleReader(tasks, w, "filter", READER),
                *filters(pre, "filter"),
                CrucibleWriter(stage1, w, "filter", WRITER, final=cut is None),
            ],
            n,
        )
    ]
    if cut is not None:
        mh = _minhash_config(steps[cut][2])
        jobs += [
            (
                "mh-sigs",
                [
                    CrucibleJsonlReader(stage1),
                    MinhashDedupSignature(f"{w}/mh/sigs", config=mh, language=CrucibleWords()),
                ],
                n,
            ),
            (
                "mh-buckets",
                [MinhashDedupBuckets(f"{w}/mh/sigs", f"{w}/mh/buckets", config=mh)],
                mh.num_buckets,
            ),
            (
                "mh-cluster",
                [MinhashDedupCluster(f"{w}/mh/buckets", f"{w}/mh/remove", config=mh)],
                1,
            ),
            (
                "mh-filter",
                [
                    CrucibleJsonlReader(stage1),
                    CrucibleCount(w, "mh-filter", COUNT_IN),
                    MinhashDedupFilter(
                        f"{w}/mh/remove",
                        exclusion_writer=SampleWriter(f"{w}/mh/removed", cfg.sample_per_reason),
                    ),
                    CrucibleCount(w, "mh-filter", COUNT_OUT),
                    *filters(post, "mh-filter"),
                    CrucibleWriter(f"{w}/final", w, "mh-filter", FINAL_WRITER, final=True),
                ],
                n,
            ),
        ]
    spec = {"cfg": cfg.model_dump(), "work": w, "tasks": n, "executor": executor,
            "workers": workers}  # fmt: skip
    jobs.append(("gather", [CrucibleGather(spec)], 1))
    return jobs


def _executors(cfg: PipelineConfig, executor: str, workers: int, work: Path) -> list:
    jobs = build_jobs(cfg, executor, workers, work)
    out, prev = [], None
    for name, pipeline, tasks in jobs:
        logs = str(work / "logs" / name)
        if executor == "datatrove-local":
            from datatrove.executor import LocalPipelineExecutor

            ex = LocalPipelineExecutor(
                pipeline, tasks=tasks, workers=min(workers, tasks), logging_dir=logs,
                depends=prev, start_method="spawn",
            )  # fmt: skip
        elif executor == "slurm":
            from datatrove.executor.slurm import SlurmPipelineExecutor

            s = cfg.datatrove.slurm  # type: ignore[union-attr]
            ex = SlurmPipelineExecutor(
                pipeline, tasks=tasks, time=s.time, partition=s.partition,
                cpus_per_task=s.cpus_per_task, mem_per_cpu_gb=s.mem_per_cpu_gb,
                workers=workers if name != "gather" else 1, job_name=f"{s.job_name}-{name}",
                qos=s.qos, env_command=s.env_command,
                venv_path=f"{s.venv_path}/bin/activate" if s.venv_path else None,
                sbatch_args=dict(s.sbatch_args) or None, logging_dir=logs, depends=prev,
            )  # fmt: skip
        else:
            from datatrove.executor.ray import RayPipelineExecutor

            ray_cfg = cfg.datatrove.ray if cfg.datatrove and cfg.datatrove.ray else None
            ex = RayPipelineExecutor(
                pipeline, tasks=tasks, workers=workers, logging_dir=logs, depends=prev,
                cpus_per_task=ray_cfg.cpus_per_task if ray_cfg else 1,
            )  # fmt: skip
        out.append(ex)
        prev = ex
    return out


def _fingerprint(cfg: PipelineConfig) -> str:
    return hashlib.sha256(json.dumps(cfg.model_dump(), sort_keys=True).encode()).hexdigest()


def run_datatrove(cfg: PipelineConfig, executor: str, workers: int) -> dict[str, Any] | None:
    """Run (local, Ray) or submit (Slurm) the jobs; the stats of a finished run, None when
    submitted."""
    check_executor(cfg, executor)
    out = Path(cfg.output)
    work = (
        Path(cfg.datatrove.work_dir)
        if cfg.datatrove and cfg.datatrove.work_dir
        else out / ".datatrove"
    )
    fp_file = work / "pipeline.sha256"
    fp = _fingerprint(cfg)
    if work.exists() and not fp_file.is_file() and any(work.iterdir()):
        raise ConfigError(
            f"datatrove.work_dir {work} holds files that are not crucible's: choose a new or "
            "empty directory"
        )
    if fp_file.is_file() and fp_file.read_text() != fp:
        shutil.rmtree(work)  # another pipeline's half-done work: start over
    work.mkdir(parents=True, exist_ok=True)
    fp_file.write_text(fp)
    executors = _executors(cfg, executor, workers, work)
    started_ray = False
    if executor == "ray":
        import ray

        address = cfg.datatrove.ray.address if cfg.datatrove and cfg.datatrove.ray else None
        if not ray.is_initialized():
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
            started_ray = True
    start = time.perf_counter()
    try:
        executors[-1].run()
    except Exception as e:
        if executor == "slurm":
            raise
        raise WorkerError(
            f"a datatrove task failed: {e}; completed tasks keep their markers in {work}/logs; "
            "fix the input and rerun the same command: only the rest runs again"
        ) from e
    finally:
        if started_ray:
            ray.shutdown()
    if executor == "slurm":
        return None
    stats = json.loads((out / "stats.json").read_text())
    stats["seconds"] = round(time.perf_counter() - start, 2)
    shutil.rmtree(work)
    return stats


# ----------------------------------------------------------------------------- gather


def _counts(work: Path) -> tuple[dict[int, Counter[str]], dict[int, list[dict]]]:
    counts: dict[int, Counter[str]] = defaultdict(Counter)
    samples: dict[int, list[dict]] = defaultdict(list)
    for path in sorted((work / "counts").glob("*/*.json")):
        index = int(path.name.split(".")[1])
        data = json.loads(path.read_text())
        counts[index].update(data["counts"])
        samples[index] += data["sample"]
    return counts, samples


def gather(spec: dict[str, Any]) -> dict[str, Any]:
    """The final job: outputs, stats.json and removal samples from every rank's files."""
    cfg = PipelineConfig.model_validate(spec["cfg"])
    work, out = Path(spec["work"]), Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    writer = _JsonlOutputs(out)
    from crucible.data.corpora import Document
    from crucible.data.datatrove_steps import read_parts

    ok = False
    try:
        for r in read_parts(work / "final", spec["tasks"]):
            writer.emit(Document(r["text"], r["meta"]["source"], r["id"]))
        ok = True
    finally:
        files = writer.close(commit=ok)
    counts, samples = _counts(work)
    sources = [s.name for s in cfg.sources]
    removed: dict[str, Counter[str]] = defaultdict(Counter)
    for c in counts.values():
        for key, n in c.items():
            if key.startswith("removed|"):
                _, source, reason = key.split("|", 2)
                removed[source][reason] += n
    step_stats: dict[str, dict[str, int]] = {}
    sample_items: list[dict] = []
    for i, st in enumerate(cfg.steps):
        for name, options in st.items():
            label = step_name(build_step(name, options))
            if name == "minhash_dedup":
                n_in, n_out = counts[COUNT_IN], counts[COUNT_OUT]
                for s in sources:
                    if n_in[s] - n_out[s]:
                        removed[s][label] += n_in[s] - n_out[s]
                step_stats[label] = {"in": sum(n_in.values()), "kept": sum(n_out.values())}
                sample_items += _minhash_sample(work, label, cfg.sample_per_reason)
            else:
                step_stats[label] = {"in": counts[i + 1]["in"], "kept": counts[i + 1]["kept"]}
                by_reason: dict[str, list[dict]] = defaultdict(list)
                for item in samples[i + 1]:
                    by_reason[item["reason"]].append(item)
                for reason in sorted(by_reason):
                    sample_items += by_reason[reason][: cfg.sample_per_reason]
    total: Counter[str] = Counter()
    for c in counts.values():
        total.update({k: v for k, v in c.items() if not k.startswith("removed|")})
    per_source = {}
    for s in sources:
        if total[f"docs_in|{s}"]:
            per_source[s] = {
                k: total[f"{k}|{s}"] for k in ("docs_in", "docs_out", "bytes_in", "bytes_out")
            } | {"removed": dict(sorted(removed[s].items()))}
    by_reason_total: Counter[str] = Counter()
    for c in removed.values():
        by_reason_total.update(c)
    stats = {
        "sources": per_source,
        "removed_by_reason": dict(sorted(by_reason_total.items(), key=lambda kv: (-kv[1], kv[0]))),
        "steps": step_stats,
        "docs_in": sum(v["docs_in"] for v in per_source.values()),
        "docs_out": sum(v["docs_out"] for v in per_source.values()),
        "run": {"executor": spec["executor"], "tasks": spec["tasks"], "workers": spec["workers"]},
        "outputs": [f.name for f in files],
    }
    for stale in out.glob("*.jsonl"):
        if stale not in files and stale.name != "removed_sample.jsonl":
            stale.unlink()
    _write_text(out / "removed_sample.jsonl", "".join(
        json.dumps(x, ensure_ascii=False) + "\n" for x in sample_items
    ))  # fmt: skip
    if cfg.tokenize is not None:
        from crucible.data.tokenize import tokenize_jsonl_dir

        stats["tokenize"] = tokenize_jsonl_dir(
            out, cfg.tokenize.tokenizer, cfg.tokenize.out,
            num_workers=cfg.tokenize.workers or spec["workers"] or 1,
            shard_tokens=cfg.tokenize.shard_tokens, show_progress=False,
        )  # fmt: skip
    _write_text(out / "stats.json", json.dumps(stats, indent=2) + "\n")
    return stats


def _minhash_sample(work: Path, label: str, k: int) -> list[dict]:
    items: list[dict] = []
    for path in sorted((work / "mh" / "removed").glob("*.json")):
        items += [{"reason": label} | x for x in json.loads(path.read_text())]
    return items[:k]
