"""Tokenize processed documents into one shard directory per source.

Input is the output of `crucible data process` (``<source>.jsonl`` files) or any JSONL with a
text field. Each source gets ``OUT/<source>/`` written by `write_shards` (multiprocess, progress
bar, EOS after each document, ``.ds.index`` document boundaries, uint16/uint32 by vocab size),
so mixtures can weight sources separately. ``OUT/sources.json`` lists them with their counts.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from crucible.data.shards import DEFAULT_SHARD_TOKENS, write_shards
from crucible.data.sources import SourceConfig, iter_source

SOURCES_JSON = "sources.json"


def _texts(path: Path, text_field: str) -> Iterator[str]:
    cfg = SourceConfig(name=path.stem, kind="jsonl", paths=[str(path)], text_field=text_field)
    for doc in iter_source(cfg):
        yield doc.text


def tokenize_jsonl_files(
    files: list[Path],
    tokenizer: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    num_workers: int = 1,
    shard_tokens: int | None = None,
    text_field: str = "text",
    show_progress: bool = True,
) -> dict[str, Any]:
    """Shards for each JSONL file, named after the file (``web.jsonl`` -> ``OUT/web/``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"tokenizer": str(tokenizer), "sources": {}}
    for path in sorted(files):
        name = path.name.removesuffix(".gz").removesuffix(".jsonl")
        meta = write_shards(
            _texts(path, text_field),
            tokenizer,
            out / name,
            prefix=name,
            shard_tokens=shard_tokens or DEFAULT_SHARD_TOKENS,
            num_workers=num_workers,
            show_progress=show_progress,
            overwrite=True,
        )
        summary["sources"][name] = {
            "dir": name,
            "tokens": meta["total_tokens"],
            "docs": meta["num_docs"],
            "dtype": meta["dtype"],
        }
    (out / SOURCES_JSON).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def tokenize_jsonl_dir(
    in_dir: str | os.PathLike[str],
    tokenizer: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    **kwargs: Any,
) -> dict[str, Any]:
    d = Path(in_dir)
    stats = d / "stats.json"
    if stats.is_file():  # a `data process` output: its kept-document files, not the sample
        files = [d / name for name in json.loads(stats.read_text()).get("outputs", [])]
    else:
        files = sorted(d.glob("*.jsonl")) + sorted(d.glob("*.jsonl.gz"))
    if not files:
        raise FileNotFoundError(f"no .jsonl files in {in_dir}")
    return tokenize_jsonl_files(files, tokenizer, out_dir, **kwargs)
