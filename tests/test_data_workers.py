"""`data process --workers N`: the same kept documents, statistics, removal sample and shards
as one process, and a failed task that names its file and record and is the only one rerun."""

import json
import random
from pathlib import Path

import pytest
import yaml

from crucible.data.pipeline import load_pipeline, run_pipeline
from crucible.data.shards import ShardSet
from crucible.data.workers import PARTS_DIR, WorkerError
from crucible.tokenizer.train import train_tokenizer

STOP = ["the", "and", "of", "to", "with"]


def good_doc(seed: int, n_words: int = 120) -> str:
    """Text that passes Gopher and C4; different seeds share no 5-grams."""
    rng = random.Random(seed)
    words = [STOP[i % 5] if i % 4 == 0 else "".join(rng.choices("abcdefghij", k=6))
             for i in range(n_words)]  # fmt: skip
    return "\n".join(" ".join(words[i : i + 12]) + "." for i in range(0, n_words, 12))


def near_copy(text: str) -> str:
    words = text.split(" ")
    words[7] = "changed"
    return " ".join(words)


def corpus(root: Path) -> None:
    """Five JSONL files and three text files; duplicates cross file (task) boundaries, so only
    a merge in input order keeps the right copy."""
    (root / "web").mkdir(parents=True)
    rng = random.Random(0)
    seeds = list(range(6))  # few: duplicates, exact and near, are certain
    for f in range(5):
        texts = []
        for _ in range(12):
            roll = rng.random()
            if roll < 0.15:
                texts.append("too short to keep")
            elif roll < 0.3:
                texts.append(good_doc(rng.choice(seeds)))  # exact duplicate, maybe earlier file
            elif roll < 0.45:
                texts.append(near_copy(good_doc(rng.choice(seeds))))  # near duplicate
            elif roll < 0.55:
                texts.append(good_doc(rng.randrange(1000, 2000)) + "\nno terminal punctuation")
            else:
                texts.append(good_doc(rng.randrange(1000, 2000)))
        lines = "".join(json.dumps({"text": t}) + "\n" for t in texts)
        (root / "web" / f"part{f}.jsonl").write_text(lines)
    (root / "books").mkdir()
    for i, seed in enumerate((0, 100, 101)):  # the first repeats a web document
        (root / "books" / f"b{i}.txt").write_text(good_doc(seed))


def pipeline(root: Path, out: str, tokenize: bool = True) -> Path:
    spec = {
        "sources": [
            {"name": "web", "kind": "jsonl", "paths": ["web"]},
            {"name": "books", "kind": "text", "paths": ["books/*.txt"]},
        ],
        "steps": [
            {"gopher_quality": {"min_doc_words": 50}},
            {"c4": {}},  # drops the unpunctuated line: the kept text differs from the input
            {"exact_dedup": None},
            {"minhash_dedup": {}},
        ],
        "output": out,
        "sample_per_reason": 2,
    }
    if tokenize:
        spec["tokenize"] = {"tokenizer": "tok/tokenizer.json", "out": f"{out}-shards"}
    path = root / f"{out}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _stats(stats: dict) -> dict:
    return {k: v for k, v in stats.items() if k not in ("seconds", "run", "tokenize")}


@pytest.fixture
def root(tmp_path) -> Path:
    corpus(tmp_path)
    train_tokenizer([good_doc(i) for i in range(50, 60)], 384, tmp_path / "tok")
    return tmp_path


def test_four_workers_match_one_process(root):
    one = run_pipeline(load_pipeline(pipeline(root, "one")), show_progress=False)
    four = run_pipeline(load_pipeline(pipeline(root, "four")), show_progress=False, workers=4)
    assert four["run"] == {"tasks": 8, "tasks_run": 8, "workers": 4}
    removed = one["removed_by_reason"]
    assert removed["exact_dedup"] > 0 and removed["minhash_dedup"] > 0  # the test has teeth
    assert removed["gopher_quality:below_min_words"] > 0
    assert _stats(four) == _stats(one)
    for name in ("web.jsonl", "books.jsonl", "removed_sample.jsonl"):
        assert (root / "four" / name).read_bytes() == (root / "one" / name).read_bytes()
    kept = [json.loads(x)["text"] for x in (root / "one" / "web.jsonl").read_text().splitlines()]
    assert len(kept) == one["sources"]["web"]["docs_out"] and len(set(kept)) == len(kept)
    assert not any("no terminal punctuation" in t for t in kept)
    assert _files(root / "four-shards") == _files(root / "one-shards")
    assert four["tokenize"]["sources"] == one["tokenize"]["sources"]
    assert not (root / "four" / PARTS_DIR).exists()  # removed after a complete merge
    # The shards read back through datatrove's own reader (nanotron's subclasses it).
    dataset = pytest.importorskip("datatrove.utils.dataset")
    seq = 16
    theirs = dataset.DatatroveFolderDataset(str(root / "four-shards" / "web"), seq_len=seq)
    ours = ShardSet(root / "four-shards" / "web")
    assert 0 < len(theirs) * (seq + 1) <= ours.num_tokens  # windows of seq + 1 tokens
    for i in (0, 1, len(theirs) - 1):
        ids = theirs[i]["input_ids"].tolist()
        assert ids == ours.read(i * (seq + 1), (i + 1) * (seq + 1)).tolist()


def test_failed_task_names_file_and_record_and_rerun_redoes_only_it(root):
    reference = run_pipeline(load_pipeline(pipeline(root, "ref", False)), show_progress=False)
    bad = root / "web" / "part2.jsonl"
    good_lines = bad.read_text()
    lines = good_lines.splitlines(keepends=True)
    bad.write_text("".join(lines[:4]) + '{"text": "broken\n' + "".join(lines[4:]))
    cfg = load_pipeline(pipeline(root, "out", False))
    with pytest.raises(WorkerError) as err:
        run_pipeline(cfg, show_progress=False, workers=2)
    msg = str(err.value)
    assert f"{bad}, record 5" in msg and "invalid JSON" in msg and "7 of 8 tasks" in msg
    parts = root / "out" / PARTS_DIR
    assert len(list(parts.glob("*.done"))) == 7  # the other workers' output is kept
    assert not (root / "out" / "web.jsonl").exists()  # no partial output
    bad.write_text(good_lines)
    stats = run_pipeline(cfg, show_progress=False, workers=2)
    assert stats["run"]["tasks_run"] == 1
    assert _stats(stats) == _stats(reference)
    assert (root / "out" / "web.jsonl").read_bytes() == (root / "ref" / "web.jsonl").read_bytes()


def test_changed_steps_invalidate_markers(root):
    cfg = load_pipeline(pipeline(root, "out", False))
    (root / "web" / "part4.jsonl").write_text("not json\n")
    with pytest.raises(WorkerError, match="part4.jsonl, record 1"):
        run_pipeline(cfg, show_progress=False, workers=2)
    (root / "web" / "part4.jsonl").unlink()
    cfg.steps = cfg.steps[:1]  # other steps: no completed part may be reused
    stats = run_pipeline(cfg, show_progress=False, workers=2)
    assert stats["run"] == {"tasks": 7, "tasks_run": 7, "workers": 2}
    assert list(stats["steps"]) == ["gopher_quality"]


def test_cli_workers_and_one_line_errors(root, capsys, monkeypatch):
    from crucible.cli import main

    path = pipeline(root, "cli", False)
    with pytest.raises(SystemExit) as code:
        main(["data", "process", str(path), "--workers", "2"])
    assert code.value.code == 0
    assert "63 documents in" in capsys.readouterr().out
    for argv, message in (
        (["--workers", "0"], "--workers must be >= 1"),
        (["--executor", "datatrove-local"], "exact_dedup is not available"),
    ):
        with pytest.raises(SystemExit) as code:
            main(["data", "process", str(path), *argv])
        err = capsys.readouterr().err
        assert code.value.code == 2 and message in err and len(err.strip().splitlines()) == 1
