"""Document sources: local text files, JSONL, Parquet, HF `datasets` streaming, embedded corpora.

Every document carries the name of the source it came from (`Document.source`), which is what
per-source statistics, per-source shards and mixtures key on. Files are read in sorted order, so
a source yields the same documents in the same order on every machine. Optional back-ends
(pyarrow for Parquet, `datasets` for the Hub) are imported only when a source needs them.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from crucible.data.corpora import Document, iter_stdlib_documents

SourceKind = Literal["text", "jsonl", "parquet", "hf", "stdlib"]
# File suffixes each file-based kind picks up in directories (a file named explicitly is taken).
FILE_SUFFIXES: dict[str, tuple[str, ...]] = {
    "text": (".txt", ".md", ".rst", ".txt.gz"),
    "jsonl": (".jsonl", ".jsonl.gz", ".json"),
    "parquet": (".parquet",),
}


class SourceConfig(BaseModel):
    """One named source of documents."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Label carried by every document (used for stats and shards).")
    kind: SourceKind
    paths: list[str] = Field(
        default_factory=list, description="Files, directories or globs (** recurses)."
    )
    text_field: str = Field("text", description="JSONL / Parquet / HF: the text column.")
    id_field: str | None = Field(None, description="Column with a document id, else file:row.")
    dataset: str | None = Field(
        None, description="hf: dataset name, local directory, or builder (json, parquet) + paths."
    )
    subset: str | None = Field(None, description="hf: config name; stdlib: one of its sources.")
    split: str = Field("train", description="hf and stdlib split.")
    max_docs: int | None = Field(None, ge=1, description="Stop after this many documents.")
    max_mb: float | None = Field(None, gt=0, description="stdlib: cap on UTF-8 text.")


def expand_paths(patterns: list[str], suffixes: tuple[str, ...] = ()) -> list[Path]:
    """Files matched by `patterns` (files, directories walked recursively, globs), sorted, unique.

    `suffixes` filters files found in directories (a file named explicitly is always taken).
    """
    found: dict[str, Path] = {}
    for pat in patterns:
        p = Path(pat)
        if glob.has_magic(pat):
            hits = [Path(x) for x in glob.glob(pat, recursive=True)]
        elif p.is_dir():
            hits = [x for x in p.rglob("*") if not suffixes or x.name.endswith(suffixes)]
        elif p.is_file():
            hits = [p]
        else:
            raise FileNotFoundError(f"no such file, directory or glob match: {pat}")
        for h in hits:
            if h.is_file():
                found.setdefault(str(h), h)
    return [found[k] for k in sorted(found)]


def _open_text(path: Path):
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")  # noqa: SIM115 - the caller closes it


def _iter_text(cfg: SourceConfig) -> Iterator[Document]:
    for path in expand_paths(cfg.paths, FILE_SUFFIXES["text"]):
        with _open_text(path) as f:
            text = f.read()
        if text.strip():
            yield Document(text, cfg.name, f"{cfg.name}:{path}")


def _record_doc(cfg: SourceConfig, record: dict, where: str) -> Document | None:
    if cfg.text_field not in record:
        raise ValueError(f"{where}: no field {cfg.text_field!r} (set text_field)")
    text = record[cfg.text_field]
    if not isinstance(text, str) or not text.strip():
        return None
    doc_id = record.get(cfg.id_field) if cfg.id_field else None
    return Document(text, cfg.name, f"{cfg.name}:{doc_id if doc_id is not None else where}")


def _iter_jsonl(cfg: SourceConfig) -> Iterator[Document]:
    for path in expand_paths(cfg.paths, FILE_SUFFIXES["jsonl"]):
        with _open_text(path) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: invalid JSON: {e}") from None
                doc = _record_doc(cfg, record, f"{path}:{lineno}")
                if doc is not None:
                    yield doc


def _iter_parquet(cfg: SourceConfig) -> Iterator[Document]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(
            f"source {cfg.name!r}: Parquet needs pyarrow (pip install pyarrow)"
        ) from None
    columns = [cfg.text_field] + ([cfg.id_field] if cfg.id_field else [])
    for path in expand_paths(cfg.paths, FILE_SUFFIXES["parquet"]):
        row = 0
        for batch in pq.ParquetFile(path).iter_batches(columns=columns):
            for record in batch.to_pylist():
                doc = _record_doc(cfg, record, f"{path}:{row}")
                row += 1
                if doc is not None:
                    yield doc


def _iter_hf(cfg: SourceConfig) -> Iterator[Document]:
    try:
        import datasets
    except ImportError:
        raise ValueError(f"source {cfg.name!r}: kind hf needs `pip install datasets`") from None
    if not cfg.dataset:
        raise ValueError(f"source {cfg.name!r}: kind hf needs `dataset`")
    # `paths` become data_files, for a builder such as dataset: json / parquet on local files.
    data_files = [str(p) for p in expand_paths(cfg.paths)] if cfg.paths else None
    # Streaming: nothing is downloaded up front; a Hub dataset fails here when offline
    # (HF_DATASETS_OFFLINE=1), local files and directories do not.
    ds = datasets.load_dataset(
        cfg.dataset, cfg.subset, data_files=data_files, split=cfg.split, streaming=True
    )
    for i, record in enumerate(ds):
        doc = _record_doc(cfg, record, f"{cfg.dataset}:{i}")
        if doc is not None:
            yield doc


def _iter_stdlib(cfg: SourceConfig) -> Iterator[Document]:
    if cfg.split not in ("train", "val"):
        raise ValueError(f"source {cfg.name!r}: stdlib split must be train or val")
    max_bytes = int(cfg.max_mb * 1e6) if cfg.max_mb else None
    for doc in iter_stdlib_documents(cfg.split, max_bytes):  # type: ignore[arg-type]
        if cfg.subset is None or doc.source == cfg.subset:
            yield Document(doc.text, cfg.name, doc.id)


_READERS = {
    "text": _iter_text,
    "jsonl": _iter_jsonl,
    "parquet": _iter_parquet,
    "hf": _iter_hf,
    "stdlib": _iter_stdlib,
}


def iter_source(cfg: SourceConfig) -> Iterator[Document]:
    """The documents of one source, in a fixed order, each labelled with `cfg.name`."""
    if cfg.kind in ("text", "jsonl", "parquet") and not cfg.paths:
        raise ValueError(f"source {cfg.name!r}: kind {cfg.kind} needs `paths`")
    return islice(_READERS[cfg.kind](cfg), cfg.max_docs)


def iter_sources(cfgs: list[SourceConfig]) -> Iterator[Document]:
    names = [c.name for c in cfgs]
    if len(set(names)) != len(names):
        raise ValueError(f"source names must be unique, got {names}")
    for cfg in cfgs:
        yield from iter_source(cfg)


def read_jsonl_documents(path: str | os.PathLike[str], source: str | None = None):
    """Documents of a JSONL file written by `crucible data process` (fields text, source, id)."""
    with _open_text(Path(path)) as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                r = json.loads(line)
                yield Document(r["text"], source or r.get("source", ""), r.get("id", str(lineno)))
