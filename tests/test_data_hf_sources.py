"""Parquet (pyarrow) and HF `datasets` document sources, on files the tests write (offline)."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from crucible.data.sources import SourceConfig, iter_source, iter_sources

ROWS = [
    {"body": "first document", "title": "t1", "uid": 11},
    {"body": "", "title": "empty", "uid": 12},  # empty text: skipped
    {"body": "second document", "title": "t2", "uid": 13},
    {"body": "third document", "title": "t3", "uid": 14},
]


def _write(tmp_path):
    """The same rows as Parquet (two row groups) and as JSONL."""
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "rows.parquet", row_group_size=2)
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return tmp_path / "rows.parquet", tmp_path / "rows.jsonl"


BODIES = ["first document", "second document", "third document"]


def test_parquet_reader(tmp_path):
    parquet, _ = _write(tmp_path)
    cfg = SourceConfig(name="pq", kind="parquet", paths=[str(tmp_path)], text_field="body")
    docs = list(iter_source(cfg))  # the directory: only .parquet files are taken
    assert [d.text for d in docs] == BODIES
    assert {d.source for d in docs} == {"pq"}
    assert [d.id for d in docs] == [f"pq:{parquet}:{i}" for i in (0, 2, 3)]  # row across groups
    with_ids = cfg.model_copy(update={"id_field": "uid", "max_docs": 2})
    assert [d.id for d in iter_source(with_ids)] == ["pq:11", "pq:13"]
    titles = cfg.model_copy(update={"text_field": "title"})
    assert [d.text for d in iter_source(titles)] == ["t1", "empty", "t2", "t3"]
    with pytest.raises(ValueError, match="no field 'text'"):
        list(iter_source(SourceConfig(name="x", kind="parquet", paths=[str(parquet)])))


@pytest.mark.parametrize("builder", ["json", "parquet"])
def test_hf_builder_on_local_files(tmp_path, builder):
    parquet, jsonl = _write(tmp_path)
    path = jsonl if builder == "json" else parquet
    cfg = SourceConfig(name="hub", kind="hf", dataset=builder, paths=[str(path)], text_field="body")
    docs = list(iter_source(cfg))
    assert [d.text for d in docs] == BODIES
    assert {d.source for d in docs} == {"hub"}
    assert [d.id for d in docs] == [f"hub:{builder}:{i}" for i in (0, 2, 3)]
    with_ids = cfg.model_copy(update={"id_field": "uid", "text_field": "title", "max_docs": 2})
    assert [(d.text, d.id) for d in iter_source(with_ids)] == [
        ("t1", "hub:11"),
        ("empty", "hub:12"),
    ]


def test_hf_local_directory_and_mixture(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (data / "test.jsonl").write_text(json.dumps({"body": "held out", "uid": 99}) + "\n")
    train = SourceConfig(name="dir", kind="hf", dataset=str(data), text_field="body")
    test = train.model_copy(update={"name": "dir_test", "split": "test"})
    docs = list(iter_sources([train, test]))
    assert [(d.source, d.text) for d in docs] == [("dir", t) for t in BODIES] + [
        ("dir_test", "held out")
    ]
    with pytest.raises(ValueError, match="needs `dataset`"):
        list(iter_source(SourceConfig(name="n", kind="hf")))
