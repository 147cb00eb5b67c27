"""`data process --executor datatrove-local|slurm|ray`: Crucible's filters as datatrove steps,
datatrove's disk-based MinHash against our in-memory one, failures, and checks before any work."""

import json
import random
import sys
from pathlib import Path

import pytest
import yaml

from crucible.config import ConfigError
from crucible.data.datatrove_run import check_executor, run_datatrove
from crucible.data.pipeline import DatatroveSection, load_pipeline, run_pipeline
from crucible.data.workers import WorkerError

sys.path.insert(0, str(Path(__file__).parent))
from test_data_workers import _stats, corpus  # noqa: E402

pytest.importorskip("datatrove")  # pinned in requirements.lock: always there in make test


def write_pipeline(root: Path, out: str, steps: list, **extra) -> Path:
    spec = {
        "sources": [
            {"name": "web", "kind": "jsonl", "paths": ["web"], **extra.pop("web", {})},
            {"name": "books", "kind": "text", "paths": ["books/*.txt"]},
        ],
        "steps": steps,
        "output": out,
        "sample_per_reason": 2,
        **extra,
    }
    path = root / f"{out}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


FILTERS = [{"gopher_quality": {"min_doc_words": 50}}, {"c4": {}}]


def test_filters_as_datatrove_steps_match_the_local_path(tmp_path):
    corpus(tmp_path)
    local = run_pipeline(load_pipeline(write_pipeline(tmp_path, "local", FILTERS)), False)
    dt = run_datatrove(load_pipeline(write_pipeline(tmp_path, "dt", FILTERS)), "datatrove-local", 2)
    assert dt["run"] == {"executor": "datatrove-local", "tasks": 8, "workers": 2}
    assert local["removed_by_reason"]["gopher_quality:below_min_words"] > 0
    assert _stats(dt) == _stats(local)  # counters summed over 8 ranks: exact
    for name in ("web.jsonl", "books.jsonl"):
        assert (tmp_path / "dt" / name).read_bytes() == (tmp_path / "local" / name).read_bytes()
    assert not (tmp_path / "dt" / ".datatrove").exists()


def _words(rng: random.Random, n: int) -> list[str]:
    return ["".join(rng.choices("abcdefghijklmnop", k=rng.randint(3, 9))) for _ in range(n)]


def planted_corpus(root: Path) -> dict[str, str]:
    """20 groups of 3 near-duplicates (2 words of 300 changed: Jaccard about 0.94) and 20
    unrelated documents, over 4 files; returns id -> group."""
    rng = random.Random(5)
    docs = []
    for g in range(20):
        base = _words(rng, 300)
        for copy in range(3):
            words = list(base)
            for _ in range(2 if copy else 0):
                words[rng.randrange(300)] = "edited"
            docs.append((f"g{g}-c{copy}", " ".join(words)))
    docs += [(f"s{i}", " ".join(_words(rng, 300))) for i in range(20)]
    rng.shuffle(docs)
    (root / "web").mkdir()
    for f in range(4):
        lines = "".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in docs[f::4])
        (root / "web" / f"p{f}.jsonl").write_text(lines)
    (root / "books").mkdir()
    return {i: i.split("-")[0] for i, _ in docs}


def test_signatures_equal_datatrove_stage_one():
    from datatrove.pipeline.dedup.minhash import MinhashDedupSignature

    from crucible.data.datatrove_run import _minhash_config
    from crucible.data.datatrove_steps import CrucibleWords
    from crucible.data.dedup import MinHashDedup

    stage1 = MinhashDedupSignature("unused", config=_minhash_config({}), language=CrucibleWords())
    rng = random.Random(3)
    for n in (5, 40, 300):  # letters only: both engines normalise such text the same way
        text = " ".join(_words(rng, n)) + ", Déjà-Vu!"
        theirs = [h for band in stage1.get_signature(stage1.get_shingles(text)) for h in band]
        assert MinHashDedup().signature(text).tolist() == theirs


def test_datatrove_minhash_clusters_agree_with_in_memory_minhash(tmp_path):
    groups = planted_corpus(tmp_path)
    steps = [{"minhash_dedup": {}}]  # 5-gram, 14 bands x 8, seed 1 on both sides
    web = {"id_field": "id"}
    local = run_pipeline(load_pipeline(write_pipeline(tmp_path, "mem", steps, web=web)), False)
    dt = run_datatrove(
        load_pipeline(write_pipeline(tmp_path, "disk", steps, web=web)), "datatrove-local", 1
    )
    planted = sorted(set(groups.values()))  # 20 groups + 20 singletons: 40 clusters
    for out, stats in (("mem", local), ("disk", dt)):
        kept = [json.loads(x)["id"].removeprefix("web:") for x in
                (tmp_path / out / "web.jsonl").read_text().splitlines()]  # fmt: skip
        assert sorted(groups[i] for i in kept) == planted, out  # one per cluster, each cluster
        assert stats["removed_by_reason"] == {"minhash_dedup": 40}
        assert stats["steps"]["minhash_dedup"] == {"in": 80, "kept": 40}
    sample = [json.loads(x) for x in (tmp_path / "disk" / "removed_sample.jsonl").open()]
    assert len(sample) == 2 and {s["reason"] for s in sample} == {"minhash_dedup"}


def test_failure_names_file_and_record_and_rerun_skips_completed_tasks(tmp_path):
    corpus(tmp_path)
    ref = run_pipeline(load_pipeline(write_pipeline(tmp_path, "ref", FILTERS)), False)
    bad = tmp_path / "web" / "part2.jsonl"
    good = bad.read_text()
    bad.write_text(good.replace("\n", "\n{oops\n", 1))  # record 2 is not JSON
    cfg = load_pipeline(write_pipeline(tmp_path, "out", FILTERS))
    with pytest.raises(WorkerError) as err:
        run_datatrove(cfg, "datatrove-local", 1)
    assert f"{bad}, record 2" in str(err.value) and "invalid JSON" in str(err.value)
    completions = tmp_path / "out" / ".datatrove" / "logs" / "filter" / "completions"
    assert sorted(p.name for p in completions.iterdir()) == ["00000", "00001"]
    bad.write_text(good)
    part0 = tmp_path / "web" / "part0.jsonl"
    saved = part0.read_text()
    part0.write_text("not json\n")  # a rerun that read it again would fail
    stats = run_datatrove(cfg, "datatrove-local", 1)
    part0.write_text(saved)
    assert _stats(stats) == _stats(ref)  # rank 0's output from the first run was kept


def test_rejected_before_any_work(tmp_path, monkeypatch):
    corpus(tmp_path)
    cfg = load_pipeline(write_pipeline(tmp_path, "o", [*FILTERS, {"exact_dedup": {}}]))
    with pytest.raises(ConfigError, match="exact_dedup is not available with --executor datat"):
        check_executor(cfg, "datatrove-local")
    with pytest.raises(ConfigError, match="exact_dedup is not available"):
        run_datatrove(cfg, "datatrove-local", 1)
    assert not (tmp_path / "o").exists()  # nothing was started
    cfg = load_pipeline(write_pipeline(tmp_path, "o", [{"c4": {"nope": 1}}]))
    with pytest.raises(ValueError, match="unknown option"):
        check_executor(cfg, "datatrove-local")
    cfg = load_pipeline(write_pipeline(tmp_path, "o", FILTERS))
    work = tmp_path / "mine"
    (work / "keep").mkdir(parents=True)
    cfg.datatrove = DatatroveSection(work_dir=str(work))
    with pytest.raises(ConfigError, match="holds files that are not crucible's"):
        run_datatrove(cfg, "datatrove-local", 1)
    assert (work / "keep").is_dir()  # a user's directory is never wiped
    cfg.datatrove = None
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="`sbatch` is not on PATH"):
        check_executor(cfg, "slurm")
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ConfigError, match=r"Ray is not installed \(pip install ray\)"):
        check_executor(cfg, "ray")
    monkeypatch.setitem(sys.modules, "datatrove", None)
    with pytest.raises(ConfigError, match="datatrove is not installed"):
        check_executor(cfg, "datatrove-local")


def test_slurm_jobs_are_configured_and_chained(tmp_path, monkeypatch):
    corpus(tmp_path)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    sbatch = bin_dir / "sbatch"
    log = tmp_path / "sbatch.log"
    sbatch.write_text(f'#!/bin/sh\necho "$@" >> {log}\necho "Submitted batch job $$"\n')
    sbatch.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    slurm = {"partition": "cpu", "time": "01:30:00", "cpus_per_task": 2, "venv_path": "/opt/v"}
    steps = [*FILTERS, {"minhash_dedup": {}}]
    cfg = load_pipeline(write_pipeline(tmp_path, "o", steps, datatrove={"slurm": slurm}))
    assert run_datatrove(cfg, "slurm", 4) is None  # submitted, not run
    logs = tmp_path / "o" / ".datatrove" / "logs"
    jobs = ["filter", "mh-sigs", "mh-buckets", "mh-cluster", "mh-filter", "gather"]
    for job in jobs:
        script = (logs / job / "launch_script.slurm").read_text()
        assert "#SBATCH --partition=cpu" in script and "#SBATCH --time=01:30:00" in script
        assert f"#SBATCH --job-name=crucible-data-{job}" in script
        assert "source /opt/v/bin/activate" in script
    assert "#SBATCH --array=0-13" in (logs / "mh-buckets" / "launch_script.slurm").read_text()
    submitted = log.read_text().splitlines()
    assert sum("--dependency=afterok:" in line for line in submitted) >= len(jobs) - 1


@pytest.mark.slow
def test_ray_executor_matches_the_local_path(tmp_path):
    pytest.importorskip("ray")  # pinned in requirements.lock: always there in make test
    corpus(tmp_path)
    local = run_pipeline(load_pipeline(write_pipeline(tmp_path, "local", FILTERS)), False)
    stats = run_datatrove(load_pipeline(write_pipeline(tmp_path, "ray", FILTERS)), "ray", 2)
    assert stats["run"]["executor"] == "ray" and _stats(stats) == _stats(local)
    for name in ("web.jsonl", "books.jsonl"):
        assert (tmp_path / "ray" / name).read_bytes() == (tmp_path / "local" / name).read_bytes()
