"""`crucible data inspect PATH`: what is in a shard directory, a JSONL file or a mixture.

For each source: documents, tokens (bytes for JSONL without a tokenizer), a length histogram
(printed, and one PNG for all sources), the share of each source, a few decoded samples, and the
tokenizer its shards were written with. Warnings name every disagreement found between shards and
tokenizers: a `--tokenizer` that is not the one recorded in ``dataset.json`` (by SHA-256, vocab
size or EOS id), a recorded tokenizer file that changed or vanished since, sources written with
different tokenizers, and token ids beyond the tokenizer's vocabulary.

Accepted PATHs: a shard directory (``dataset.json``, bare ``.ds`` files, or a ``data tokenize``
output holding ``sources.json``), a ``.jsonl``/``.jsonl.gz`` file or a directory of them (a
``data process`` output), and a mixture YAML (a ``data mixture`` plan with ``shards: DIR``, or a
``sources: {name: shard dir}`` mapping, at the top level or under ``data:`` as in a run config).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from tokenizers import Tokenizer

from crucible.data.shards import DATASET_JSON, SHARD_SUFFIX, ShardSet
from crucible.data.sources import SourceConfig, iter_source
from crucible.data.tokenize import SOURCES_JSON
from crucible.tokenizer.train import load_tokenizer

SAMPLE_CHARS = 300


@dataclass
class SourceView:
    name: str
    path: str
    unit: str  # "tokens" or "bytes": what `lengths` counts
    lengths: np.ndarray  # per document
    samples: list[str]
    tokenizer: str | None = None  # recorded when the shards were written
    tokenizer_sha256: str | None = None

    @property
    def docs(self) -> int:
        return len(self.lengths)

    @property
    def total(self) -> int:
        return int(self.lengths.sum())


@dataclass
class Inspection:
    kind: str  # shards | jsonl | mixture
    sources: list[SourceView]
    warnings: list[str] = field(default_factory=list)
    stages: list[dict[str, Any]] = field(default_factory=list)  # mixtures: name, weights
    capped: bool = False  # JSONL read up to max_docs only


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _decode(tok: Tokenizer | None, ids: np.ndarray) -> str:
    if tok is None:
        return f"<no tokenizer to decode with: {ids[:16].tolist()}...>"
    return tok.decode(ids.tolist(), skip_special_tokens=False)[:SAMPLE_CHARS]


def _shard_source(
    name: str, d: Path, user_tok: Path | None, n_samples: int, rng: np.random.Generator
) -> tuple[SourceView, list[str]]:
    shards = ShardSet(d)
    meta = shards.meta
    warnings: list[str] = []
    recorded = meta.get("tokenizer")
    recorded_sha = meta.get("tokenizer_sha256")
    if not meta:  # foreign (datatrove) shards: only the name in .ds.metadata
        first = shards.paths[0].with_name(shards.paths[0].name + ".metadata")
        if first.is_file():
            recorded = (first.read_text().splitlines() or [""])[0].rsplit("|", 1)[0] or None
    decode_with: Path | None = user_tok
    if user_tok is not None and recorded_sha and _sha256(user_tok) != recorded_sha:
        tok = load_tokenizer(user_tok)
        diffs = [f"sha256 {recorded_sha[:12]} vs {_sha256(user_tok)[:12]}"]
        if meta.get("vocab_size") != tok.get_vocab_size(with_added_tokens=True):
            diffs.append(
                f"vocab {meta.get('vocab_size')} vs {tok.get_vocab_size(with_added_tokens=True)}"
            )
        warnings.append(
            f"{name}: shards in {d} were written with {recorded}, not {user_tok} "
            f"({'; '.join(diffs)})"
        )
    elif user_tok is None and recorded and meta:
        rec = Path(recorded)
        if not rec.is_file():
            warnings.append(f"{name}: tokenizer {recorded} recorded in {d} no longer exists")
        elif recorded_sha and _sha256(rec) != recorded_sha:
            warnings.append(f"{name}: tokenizer {recorded} changed since {d} was written")
        else:
            decode_with = rec
    tok = load_tokenizer(decode_with) if decode_with is not None else None
    if tok is not None and shards.num_tokens:
        maps = [np.memmap(f, dtype=shards.dtype, mode="r") for f in shards.paths]
        top = max(int(m.max()) for m in maps if len(m))
        vocab = tok.get_vocab_size(with_added_tokens=True)
        if top >= vocab:
            warnings.append(f"{name}: token id {top} in {d} is outside the vocabulary ({vocab})")
    ends = shards.doc_ends
    lengths = np.diff(np.concatenate([[0], ends])) if len(ends) else np.empty(0, np.int64)
    samples = []
    if len(ends):
        picks = np.sort(rng.choice(len(ends), min(n_samples, len(ends)), replace=False))
        for i in picks:
            start = int(ends[i - 1]) if i else 0
            ids = shards.read(start, int(ends[i]))
            if shards.eos_id is not None and len(ids) and ids[-1] == shards.eos_id:
                ids = ids[:-1]
            samples.append(_decode(tok, ids))
    view = SourceView(name, str(d), "tokens", lengths, samples, recorded, recorded_sha)
    return view, warnings


def _shard_dirs(root: Path) -> list[tuple[str, Path]]:
    if (root / SOURCES_JSON).is_file():
        summary = json.loads((root / SOURCES_JSON).read_text())
        return [(n, root / s["dir"]) for n, s in summary["sources"].items()]
    if (root / DATASET_JSON).is_file() or any(root.glob(f"*{SHARD_SUFFIX}")):
        return [(root.name, root)]
    return [(d.name, d) for d in sorted(root.iterdir()) if (d / DATASET_JSON).is_file()]


def _jsonl_sources(
    files: list[Path], user_tok: Path | None, n_samples: int, max_docs: int | None, seed: int
) -> tuple[list[SourceView], bool]:
    tok = load_tokenizer(user_tok) if user_tok is not None else None
    texts: dict[str, list[str]] = {}
    capped = False
    n = 0
    for f in files:
        for doc in iter_source(SourceConfig(name=f.stem, kind="jsonl", paths=[str(f)])):
            if max_docs is not None and n >= max_docs:
                capped = True
                break
            texts.setdefault(f.name.removesuffix(".gz").removesuffix(".jsonl"), []).append(doc.text)
            n += 1
    views = []
    rng = np.random.default_rng(seed)
    for name, docs in texts.items():
        if tok is not None:
            lengths = np.array([len(e.ids) for e in tok.encode_batch(docs)], dtype=np.int64)
        else:
            lengths = np.array([len(t.encode()) for t in docs], dtype=np.int64)
        picks = np.sort(rng.choice(len(docs), min(n_samples, len(docs)), replace=False))
        samples = [docs[i][:SAMPLE_CHARS] for i in picks]
        unit = "tokens" if tok is not None else "bytes"
        views.append(SourceView(name, str(files[0].parent), unit, lengths, samples))
    return views, capped


def _mixture(path: Path) -> tuple[list[tuple[str, Path]], list[dict[str, Any]]]:
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping (a mixture plan or a run config)")
    plan = raw.get("data") if isinstance(raw.get("data"), dict) else raw
    base = path.parent
    stages = [{"name": s.get("name", f"stage{i}"), "weights": s.get("weights", {})}
              for i, s in enumerate(plan.get("stages") or [])]  # fmt: skip
    if "shards" in plan:
        return _shard_dirs(base / plan["shards"]), stages
    if isinstance(plan.get("sources"), dict) and plan["sources"]:
        return [(n, base / p) for n, p in plan["sources"].items()], stages
    raise ValueError(f"{path}: a mixture needs `shards: DIR` or `sources: {{name: shard dir}}`")


def inspect_path(
    path: str | os.PathLike[str],
    tokenizer: str | os.PathLike[str] | None = None,
    samples: int = 3,
    max_docs: int | None = None,
    seed: int = 0,
) -> Inspection:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"data inspect: no such file or directory: {p}")
    user_tok = Path(tokenizer) if tokenizer else None
    if user_tok is not None and not (user_tok.is_file() or (user_tok / "tokenizer.json").is_file()):
        raise FileNotFoundError(f"--tokenizer: no tokenizer.json at {user_tok}")
    if user_tok is not None and user_tok.is_dir():
        user_tok = user_tok / "tokenizer.json"
    rng = np.random.default_rng(seed)
    stages: list[dict[str, Any]] = []
    if p.is_file() and p.suffix in (".yaml", ".yml"):
        kind = "mixture"
        dirs, stages = _mixture(p)
    elif p.is_file() and (p.name.endswith((".jsonl", ".jsonl.gz"))):
        views, capped = _jsonl_sources([p], user_tok, samples, max_docs, seed)
        return Inspection("jsonl", views, capped=capped)
    elif p.is_dir():
        dirs = _shard_dirs(p)
        kind = "shards"
        if not dirs:
            stats = p / "stats.json"
            if stats.is_file():  # a `data process` output: the kept documents, not the sample
                files = [p / n for n in json.loads(stats.read_text()).get("outputs", [])]
            else:
                files = sorted(p.glob("*.jsonl")) + sorted(p.glob("*.jsonl.gz"))
            if not files:
                raise FileNotFoundError(f"data inspect: no shards or .jsonl files in {p}")
            views, capped = _jsonl_sources(files, user_tok, samples, max_docs, seed)
            return Inspection("jsonl", views, capped=capped)
    else:
        raise ValueError(
            f"data inspect: {p} is not a shard directory, .jsonl file or .yaml mixture"
        )
    views, warnings = [], []
    for name, d in dirs:
        view, warn = _shard_source(name, d, user_tok, samples, rng)
        views.append(view)
        warnings += warn
    shas = {v.tokenizer_sha256 for v in views if v.tokenizer_sha256}
    if len(shas) > 1:
        names = ", ".join(f"{v.name}: {v.tokenizer}" for v in views)
        warnings.append(f"sources were written with different tokenizers ({names})")
    return Inspection(kind, views, warnings, stages)


def length_bins(lengths: np.ndarray) -> list[tuple[int, int, int]]:
    """(low, high, count) over power-of-two bins [low, high) that cover `lengths`."""
    if not len(lengths):
        return []
    top = int(np.ceil(np.log2(max(2, int(lengths.max()) + 1))))
    edges = [0] + [1 << k for k in range(1, top + 1)]
    counts, _ = np.histogram(lengths, bins=edges)
    return [(lo, hi, int(c)) for lo, hi, c in zip(edges[:-1], edges[1:], counts)]


def format_report(ins: Inspection, width: int = 40) -> str:
    lines = []
    total = sum(v.total for v in ins.sources) or 1
    unit = ins.sources[0].unit if ins.sources else "tokens"
    head = f"{'source':<16} {'docs':>10} {unit:>14} {'share':>7} {'mean len':>9}  tokenizer"
    lines += [head, "-" * len(head)]
    for v in ins.sources:
        mean = v.total / v.docs if v.docs else 0
        tok = Path(v.tokenizer).name if v.tokenizer else "-"
        lines.append(
            f"{v.name:<16} {v.docs:>10,} {v.total:>14,} {v.total / total:>7.1%} {mean:>9.1f}  {tok}"
        )
    docs = sum(v.docs for v in ins.sources)
    lines.append(f"{'total':<16} {docs:>10,} {sum(v.total for v in ins.sources):>14,}")
    if ins.capped:
        lines.append("(JSONL read up to --max-docs documents only)")
    for st in ins.stages:
        w = st["weights"]
        s = sum(w.values()) or 1
        lines.append(f"stage {st['name']}: " + ", ".join(f"{k} {x / s:.1%}" for k, x in w.items()))
    for v in ins.sources:
        lines.append(f"\n{v.name}: document length ({v.unit}) histogram")
        if v.docs:
            q = np.percentile(v.lengths, [50, 90])
            lines.append(f"  median {q[0]:.0f}, p90 {q[1]:.0f}, max {int(v.lengths.max())}")
        bins = length_bins(v.lengths)
        while bins and bins[0][2] == 0:  # start at the shortest document
            bins = bins[1:]
        most = max((c for *_, c in bins), default=1) or 1
        for lo, hi, c in bins:
            lines.append(f"  [{lo:>7}, {hi:>7})  {c:>8,}  {'#' * round(width * c / most)}")
        for i, s in enumerate(v.samples):
            lines.append(f"  sample {i}: {s!r}")
    lines += [f"warning: {w}" for w in ins.warnings]
    return "\n".join(lines)


def histogram_png(ins: Inspection, out: str | os.PathLike[str]) -> Path:
    """Document-length histograms of all sources, log-spaced bins, one PNG (atomic write)."""
    import matplotlib.pyplot as plt

    from crucible.report.plots import save_figure  # sets the Agg back-end

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    top = max((int(v.lengths.max()) for v in ins.sources if v.docs), default=1)
    edges = np.unique(np.geomspace(1, max(2, top + 1), 40).astype(np.int64))
    for v in ins.sources:
        if v.docs:
            ax.hist(v.lengths, bins=edges, histtype="step", label=f"{v.name} ({v.docs:,} docs)")
    ax.set_xscale("log")
    unit = ins.sources[0].unit if ins.sources else "tokens"
    ax.set_xlabel(f"document length ({unit})")
    ax.set_ylabel("documents")
    ax.grid(alpha=0.3)
    if any(v.docs for v in ins.sources):
        ax.legend(fontsize="small")
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_figure(fig, path)
