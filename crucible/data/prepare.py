"""Turn a `DataConfig` into a tokenizer and train/val shard directories, building them if needed.

Either the config names existing shards (``train_shards`` + ``val_shards`` + ``tokenizer``), which
are validated and returned, or the embedded stdlib corpus is built once into
``cache_dir/stdlib-<key>/`` where the key hashes everything the result depends on (corpus, vocab
size, size cap, Python version, the given tokenizer's content). A build happens in a temporary
directory renamed into place when done, so a killed build is never mistaken for a complete one and
concurrent builders (e.g. several ranks) cannot corrupt each other: the first rename wins.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from crucible.config import DataConfig
from crucible.data.chat_source import CHAT_PREFIX, build_chat_shards
from crucible.data.corpora import iter_stdlib_documents
from crucible.data.shards import ShardSet, write_shards
from crucible.tokenizer.train import (
    BYTE_ALPHABET_SIZE,
    DEFAULT_SPECIAL_TOKENS,
    load_tokenizer,
    train_tokenizer,
)

CACHE_VERSION = 2  # 2: per-kind train shards (train-code, train-prose)
BUILD_JSON = "build.json"
VAL_SHARE = 0.05
MIN_VAL_BYTES = 100_000


@dataclass(frozen=True)
class PreparedData:
    tokenizer_path: Path
    train_dir: Path | None  # a directory or glob of .ds shards; None for a mixture
    val_dir: Path
    sources: dict[str, Path] | None = None  # a mixture: source name -> shards


def check_tokenizer_vocab(tokenizer_path: str | os.PathLike[str], vocab_size: int) -> int:
    """Number of tokens in the tokenizer; ValueError when the model's embedding cannot hold them."""
    n = load_tokenizer(tokenizer_path).get_vocab_size(with_added_tokens=True)
    if n > vocab_size:
        raise ValueError(
            f"tokenizer {tokenizer_path} has {n} tokens but model.vocab_size is {vocab_size}"
        )
    return n


def _check_shards(shards: ShardSet, spec: str, what: str, seq_len: int, vocab: int | None) -> None:
    if shards.num_tokens < seq_len + 1:
        raise ValueError(
            f"{what} {spec} has {shards.num_tokens} tokens, fewer than seq_len + 1 = "
            f"{seq_len + 1}; use more data or a shorter train.seq_len"
        )
    if vocab is not None and shards.vocab_size is not None and shards.vocab_size != vocab:
        raise ValueError(
            f"{what} {spec} were tokenized with a {shards.vocab_size}-token vocabulary "
            f"but the tokenizer has {vocab}"
        )


def _given_data(cfg: DataConfig, vocab_size: int, seq_len: int) -> PreparedData:
    what = "data.sources" if cfg.sources else "data.train_shards"
    if cfg.val_shards is None:
        raise ValueError(f"data.val_shards must be set when {what} is set")
    if cfg.tokenizer is None:
        raise ValueError(f"data.tokenizer must be set when {what} is set")
    # Opening checks existence first: FileNotFoundError naming the path when absent or empty.
    train_specs = (
        {f"data.sources.{k}": v for k, v in cfg.sources.items()}
        if cfg.sources
        else {"data.train_shards": cfg.train_shards}
    )
    opened = {field: ShardSet(spec) for field, spec in train_specs.items()}
    val = ShardSet(cfg.val_shards)
    n = check_tokenizer_vocab(cfg.tokenizer, vocab_size)
    for field, shards in opened.items():
        _check_shards(shards, train_specs[field], field, seq_len, n)
    _check_shards(val, cfg.val_shards, "data.val_shards", seq_len, n)
    sources = {k: Path(v) for k, v in cfg.sources.items()} or None
    train = Path(cfg.train_shards) if cfg.train_shards else None
    return PreparedData(Path(cfg.tokenizer), train, Path(cfg.val_shards), sources)


def cache_key(cfg: DataConfig, vocab_size: int) -> str:
    parts = {
        "version": CACHE_VERSION,
        "corpus": cfg.corpus,
        "vocab_size": vocab_size,
        "max_corpus_mb": cfg.max_corpus_mb,
        "python": f"{platform.python_implementation()}-{platform.python_version()}",
        # The content, not the path: a retrained tokenizer at the same path needs new shards.
        "tokenizer": (
            hashlib.sha256(Path(cfg.tokenizer).read_bytes()).hexdigest() if cfg.tokenizer else None
        ),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]


# Embedded-corpus sources a mixture can name as `stdlib:<kind>` (see docs/training.md).
STDLIB_KINDS = {"code": {"stdlib-code"}, "prose": {"stdlib-docs", "pydoc-topics"}}
STDLIB_PREFIX = "stdlib:"


def _layout(root: Path) -> PreparedData:
    return PreparedData(root / "tokenizer.json", root / "train", root / "val")


def _build_stdlib(cfg: DataConfig, vocab_size: int, tmp: Path, console: Console) -> dict:
    t0 = time.perf_counter()
    max_bytes = int(cfg.max_corpus_mb * 1_000_000)
    train_all = list(iter_stdlib_documents("train", max_bytes))
    train_docs = [d.text for d in train_all]
    # Validation stays a small share of the cap (all of the val split at the default 12 MB).
    val_bytes = max(int(max_bytes * VAL_SHARE), MIN_VAL_BYTES)
    val_docs = [d.text for d in iter_stdlib_documents("val", val_bytes)]
    mb = sum(len(t.encode()) for t in train_docs) / 1e6
    t1 = time.perf_counter()
    console.print(
        f"  corpus: {len(train_docs)} train / {len(val_docs)} val documents ({mb:.1f} MB)"
    )

    tok_path = tmp / "tokenizer.json"
    if cfg.tokenizer:
        load_tokenizer(cfg.tokenizer)  # fail early on a bad file
        shutil.copyfile(cfg.tokenizer, tok_path)
        console.print(f"  tokenizer: using {cfg.tokenizer}")
    else:
        # Round to 128 only when that cannot exceed the model's embedding table.
        round_to = 128 if vocab_size % 128 == 0 else 1
        train_tokenizer(train_docs, vocab_size, tmp, round_to=round_to)
        console.print(f"  tokenizer: trained byte-level BPE, {vocab_size} tokens")
    check_tokenizer_vocab(tok_path, vocab_size)
    t2 = time.perf_counter()

    show = console.is_terminal and not console.quiet
    train = write_shards(train_docs, tok_path, tmp / "train", "train", show_progress=show)
    val = write_shards(val_docs, tok_path, tmp / "val", "val", show_progress=show)
    # The same training text split by kind, so mixtures can weigh code against prose.
    for kind, wanted in STDLIB_KINDS.items():
        docs = [d.text for d in train_all if d.source in wanted]
        write_shards(docs, tok_path, tmp / f"train-{kind}", kind, show_progress=show)
    t3 = time.perf_counter()
    shard_dirs = ["train", "val", *(f"train-{k}" for k in STDLIB_KINDS)]
    for p in (tmp / d / "dataset.json" for d in shard_dirs):
        meta = json.loads(p.read_text())
        meta["tokenizer"] = "../tokenizer.json"  # relative: the directory is renamed after this
        p.write_text(json.dumps(meta, indent=2) + "\n")
    bytes_per_token = mb * 1e6 / max(1, train["total_tokens"])
    console.print(
        f"  shards: {train['total_tokens']:,} train / {val['total_tokens']:,} val tokens "
        f"({bytes_per_token:.2f} bytes/token)"
    )
    return {
        "corpus": cfg.corpus,
        "vocab_size": vocab_size,
        "max_corpus_mb": cfg.max_corpus_mb,
        "python": platform.python_version(),
        "tokenizer_source": cfg.tokenizer,
        "train_tokens": train["total_tokens"],
        "val_tokens": val["total_tokens"],
        "train_docs": train["num_docs"],
        "val_docs": val["num_docs"],
        "seconds": {
            "corpus": round(t1 - t0, 2),
            "tokenizer": round(t2 - t1, 2),
            "shards": round(t3 - t2, 2),
        },
    }


def prepare_data(
    data_cfg: DataConfig, vocab_size: int, seq_len: int, quiet: bool = False
) -> PreparedData:
    """Tokenizer and train/val shard locations for `data_cfg`, building the corpus if needed."""
    chat = {k: v for k, v in data_cfg.sources.items() if v.startswith(CHAT_PREFIX)}
    if chat:
        return _chat_mixture(data_cfg, chat, vocab_size, seq_len, quiet)
    embedded = {k: v for k, v in data_cfg.sources.items() if v.startswith(STDLIB_PREFIX)}
    if embedded:
        return _embedded_mixture(data_cfg, embedded, vocab_size, seq_len, quiet)
    if data_cfg.train_shards is not None or data_cfg.sources:
        return _given_data(data_cfg, vocab_size, seq_len)
    if data_cfg.corpus != "stdlib":
        raise ValueError(f"data.corpus {data_cfg.corpus!r}: set data.train_shards or corpus=stdlib")

    if data_cfg.tokenizer is not None and not Path(data_cfg.tokenizer).is_file():
        raise FileNotFoundError(f"data.tokenizer {data_cfg.tokenizer}: file not found")
    minimum = BYTE_ALPHABET_SIZE + len(DEFAULT_SPECIAL_TOKENS)
    if data_cfg.tokenizer is None and vocab_size < minimum:
        raise ValueError(
            f"model.vocab_size {vocab_size} is too small to train a byte-level tokenizer: it "
            f"needs at least {minimum} ({BYTE_ALPHABET_SIZE} bytes + "
            f"{len(DEFAULT_SPECIAL_TOKENS)} special tokens)"
        )
    console = Console(stderr=True, quiet=quiet)
    cache = Path(data_cfg.cache_dir)
    root = cache / f"stdlib-{cache_key(data_cfg, vocab_size)}"
    if not (root / BUILD_JSON).is_file():
        console.print(
            f"[bold]data[/]: building the stdlib corpus (cap {data_cfg.max_corpus_mb} MB, "
            f"vocab {vocab_size}) in {root}"
        )
        start = time.perf_counter()
        tmp = cache / f".{root.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        try:
            info = _build_stdlib(data_cfg, vocab_size, tmp, console)
            info["seconds"]["total"] = round(time.perf_counter() - start, 2)
            (tmp / BUILD_JSON).write_text(json.dumps(info, indent=2) + "\n")
            try:
                os.replace(tmp, root)
            except OSError:
                if not (root / BUILD_JSON).is_file():  # a leftover that is not ours: replace it
                    shutil.rmtree(root)
                    os.replace(tmp, root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # only left when another builder won
        console.print(f"[bold]data[/]: built in {time.perf_counter() - start:.1f}s")
    else:
        console.print(f"[bold]data[/]: reusing {root}")

    prepared = _layout(root)
    check_tokenizer_vocab(prepared.tokenizer_path, vocab_size)
    for what, path in (
        ("train shards", prepared.train_dir),
        ("validation shards", prepared.val_dir),
    ):
        _check_shards(ShardSet(path), str(path), what, seq_len, None)
    return prepared


def _embedded_mixture(
    cfg: DataConfig, embedded: dict[str, str], vocab_size: int, seq_len: int, quiet: bool
) -> PreparedData:
    """A mixture naming `stdlib:code` / `stdlib:prose`: build (or reuse) the embedded corpus and
    point those sources at its per-kind shards; the tokenizer and validation default to its own."""
    bad = {k: v for k, v in embedded.items() if v[len(STDLIB_PREFIX) :] not in STDLIB_KINDS}
    if bad:
        kinds = ", ".join(STDLIB_PREFIX + k for k in STDLIB_KINDS)
        raise ValueError(f"data.sources {bad}: unknown embedded source (known: {kinds})")
    built = prepare_data(
        cfg.model_copy(update={"sources": {}, "stages": [], "corpus": "stdlib"}),
        vocab_size,
        seq_len,
        quiet,
    )
    root = built.tokenizer_path.parent
    resolved = {
        name: str(root / f"train-{spec[len(STDLIB_PREFIX) :]}") if name in embedded else spec
        for name, spec in cfg.sources.items()
    }
    given = cfg.model_copy(
        update={
            "sources": resolved,
            "tokenizer": cfg.tokenizer or str(built.tokenizer_path),
            "val_shards": cfg.val_shards or str(built.val_dir),
        }
    )
    return _given_data(given, vocab_size, seq_len)


def _chat_mixture(
    cfg: DataConfig, chat: dict[str, str], vocab_size: int, seq_len: int, quiet: bool
) -> PreparedData:
    """A mixture naming `chat:PATH` sources (mid-training): render and tokenize each file into
    cached shards with the mixture's tokenizer (data.tokenizer, else the embedded corpus's), then
    prepare the mixture with those shard directories in their place."""
    console = Console(stderr=True, quiet=quiet)
    tokenizer = cfg.tokenizer
    if tokenizer is None:
        built = prepare_data(
            cfg.model_copy(update={"sources": {}, "stages": [], "corpus": "stdlib"}),
            vocab_size, seq_len, quiet,
        )  # fmt: skip
        tokenizer = str(built.tokenizer_path)
    resolved = dict(cfg.sources)
    for name, spec in chat.items():
        try:
            resolved[name] = str(
                build_chat_shards(spec, tokenizer, cfg.cache_dir, say=console.print)
            )
        except (FileNotFoundError, ValueError) as e:
            raise ValueError(f"data.sources.{name}: {e}") from None
    embedded = any(v.startswith(STDLIB_PREFIX) for v in resolved.values())
    # With embedded sources the tokenizer stays unset, so the corpus cache key is unchanged.
    update: dict = {"sources": resolved}
    if not embedded:
        update["tokenizer"] = tokenizer
    return prepare_data(cfg.model_copy(update=update), vocab_size, seq_len, quiet)
