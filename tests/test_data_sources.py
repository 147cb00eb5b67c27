"""Document sources: text globs, JSONL, optional Parquet, the embedded corpus."""

import gzip
import json
import sys

import pytest

from crucible.data.sources import SourceConfig, expand_paths, iter_source, iter_sources


def test_text_files_and_globs(tmp_path):
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("beta")
    (tmp_path / "sub" / "empty.txt").write_text("  \n")
    (tmp_path / "skip.bin").write_text("binary")
    cfg = SourceConfig(name="docs", kind="text", paths=[str(tmp_path)])
    docs = list(iter_source(cfg))
    assert [d.text for d in docs] == ["alpha", "beta"]  # sorted, empty skipped
    assert {d.source for d in docs} == {"docs"}
    glob_cfg = SourceConfig(name="g", kind="text", paths=[str(tmp_path / "**" / "*.md")])
    assert [d.text for d in iter_source(glob_cfg)] == ["beta"]
    with pytest.raises(FileNotFoundError):
        expand_paths([str(tmp_path / "missing.txt")])


def test_jsonl(tmp_path):
    rows = [{"content": "one", "uid": 7}, {"content": ""}, {"content": "two"}]
    path = tmp_path / "x.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    with gzip.open(tmp_path / "y.jsonl.gz", "wt") as f:
        f.write(json.dumps({"content": "three"}) + "\n")
    cfg = SourceConfig(
        name="web", kind="jsonl", paths=[str(tmp_path)], text_field="content", id_field="uid"
    )
    docs = list(iter_source(cfg))
    assert [d.text for d in docs] == ["one", "two", "three"]
    assert docs[0].id == "web:7" and docs[1].id.endswith("x.jsonl:3")
    assert [d.text for d in iter_source(cfg.model_copy(update={"max_docs": 2}))] == ["one", "two"]
    with pytest.raises(ValueError, match="no field 'text'"):
        list(iter_source(SourceConfig(name="w", kind="jsonl", paths=[str(path)])))


def test_parquet_without_pyarrow_is_a_clear_error(tmp_path, monkeypatch):
    # Simulate an environment without pyarrow (the pinned one has it).
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    (tmp_path / "x.parquet").write_bytes(b"PAR1")
    with pytest.raises(ValueError, match="pyarrow"):
        list(iter_source(SourceConfig(name="p", kind="parquet", paths=[str(tmp_path)])))


def test_stdlib_source_and_unique_names():
    cfg = SourceConfig(name="prose", kind="stdlib", subset="pydoc-topics", max_docs=3)
    docs = list(iter_source(cfg))
    assert len(docs) == 3 and {d.source for d in docs} == {"prose"}
    with pytest.raises(ValueError, match="unique"):
        list(iter_sources([cfg, cfg]))
