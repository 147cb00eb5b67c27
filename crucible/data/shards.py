"""Tokenized binary shards in the datatrove / nanotron ``.ds`` layout.

Conventions (checked against datatrove's ``TokenizedFile``/``DocumentTokenizer`` writer and its
``DatatroveFolderDataset`` reader, which nanotron's ``TokenizedBytesFolderDataset`` subclasses):

* ``NAME.ds``: the token ids of all documents of the shard, concatenated, no header. Little-endian
  ``uint16`` (token_size 2) unless the vocabulary has more than 65536 entries, then ``uint32``
  (token_size 4); the same rule as datatrove's ``token_size`` property. The EOS token is appended
  after every document and is part of it (datatrove adds it with a ``$A <EOS>`` post-processor).
* ``NAME.ds.index``: little-endian ``uint64`` end offsets of each document, counted in *tokens*
  (not bytes), exclusive, cumulative from 0 within this file, no count header. So the last entry
  equals the number of tokens in ``NAME.ds``.
* ``NAME.ds.metadata``: text, three lines: ``<tokenizer name>|<token_size>``, the token count, and
  a human-readable count (datatrove writes e.g. ``1.2 MT``); informational only.

A document never spans two shards: a new shard starts once the current one holds `shard_tokens`.
On top of datatrove's files, the output directory gets ``dataset.json`` (vocab size, EOS id, dtype,
counts, shard list). It is written last, so its presence marks a complete dataset. Every file is
written under a temporary name and renamed, so a killed writer never leaves a valid-looking shard.
"""

from __future__ import annotations

import glob
import hashlib
import json
import multiprocessing
import os
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from tokenizers import Tokenizer

from crucible.tokenizer.train import eos_id as tokenizer_eos_id
from crucible.tokenizer.train import load_tokenizer

SHARD_SUFFIX = ".ds"
DATASET_JSON = "dataset.json"
DEFAULT_SHARD_TOKENS = 1 << 26  # 64 Mi tokens: 128 MiB per uint16 shard
FORMAT_VERSION = 1


def token_dtype(vocab_size: int) -> np.dtype:
    """Little-endian uint16 while every id fits (vocab <= 65536), else uint32."""
    return np.dtype("<u2") if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype("<u4")


def _human(n: int) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}T"
    return f"{n} T"


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = _tmp(path)
    tmp.write_bytes(data)
    os.replace(tmp, path)


class _ShardWriter:
    """Appends documents to ``PREFIX_NNNNN.ds`` files, rolling over at `shard_tokens`."""

    def __init__(self, out_dir: Path, prefix: str, dtype: np.dtype, shard_tokens: int, name: str):
        self.out_dir, self.prefix, self.dtype = out_dir, prefix, dtype
        self.shard_tokens, self.tokenizer_name = shard_tokens, name
        self.shards: list[dict[str, Any]] = []
        self._file = None
        self._ends: list[int] = []
        self._n = 0

    def add(self, ids: np.ndarray) -> None:
        if self._file is None:
            self._path = self.out_dir / f"{self.prefix}_{len(self.shards):05d}{SHARD_SUFFIX}"
            self._file = open(_tmp(self._path), "wb")  # noqa: SIM115 - closed in _close_shard
        self._file.write(ids.astype(self.dtype, copy=False).tobytes())
        self._n += len(ids)
        self._ends.append(self._n)
        if self._n >= self.shard_tokens:
            self._close_shard()

    def _close_shard(self) -> None:
        assert self._file is not None
        self._file.close()
        path = self._path
        _write_atomic(
            path.with_name(path.name + ".index"), np.asarray(self._ends, dtype="<u8").tobytes()
        )
        meta = f"{self.tokenizer_name}|{self.dtype.itemsize}\n{self._n}\n{_human(self._n)}"
        _write_atomic(path.with_name(path.name + ".metadata"), meta.encode())
        os.replace(_tmp(path), path)  # the .ds itself last
        self.shards.append({"file": path.name, "tokens": self._n, "docs": len(self._ends)})
        self._file, self._ends, self._n = None, [], 0

    def finish(self) -> None:
        if self._file is not None:
            self._close_shard()


# ----------------------------------------------------------------------------- tokenization

_worker_tok: Tokenizer | None = None
_worker_eos = 0


def _prepare_tokenizer(path: str) -> tuple[Tokenizer, int]:
    tok = load_tokenizer(path)
    # Text that happens to contain "<|endoftext|>" must stay text, never a control token.
    tok.encode_special_tokens = True
    tok.no_padding()
    tok.no_truncation()
    return tok, tokenizer_eos_id(tok)


def _encode(tok: Tokenizer, eos: int, texts: list[str]) -> list[np.ndarray]:
    out = []
    for enc in tok.encode_batch_fast(texts, add_special_tokens=False):
        ids = np.empty(len(enc.ids) + 1, dtype=np.int64)
        ids[:-1] = enc.ids
        ids[-1] = eos
        out.append(ids)
    return out


def _worker_init(path: str) -> None:
    global _worker_tok, _worker_eos
    _worker_tok, _worker_eos = _prepare_tokenizer(path)


def _worker_encode(texts: list[str]) -> list[np.ndarray]:
    assert _worker_tok is not None
    return _encode(_worker_tok, _worker_eos, texts)


def _batches(docs: Iterable[str], size: int) -> Iterator[list[str]]:
    it = (d for d in docs if d)  # an empty document would be a lone EOS: skip it
    while batch := list(islice(it, size)):
        yield batch


def _encoded_batches(
    docs: Iterable[str], tokenizer_path: str, batch_size: int, num_workers: int
) -> Iterator[tuple[int, list[np.ndarray]]]:
    """(number of texts, their ids + EOS) per batch, in input order."""
    if num_workers <= 1:
        tok, eos = _prepare_tokenizer(tokenizer_path)
        for batch in _batches(docs, batch_size):
            yield len(batch), _encode(tok, eos, batch)
        return
    # spawn, not fork: forking after the Rust thread pool has run can deadlock.
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(num_workers, ctx, _worker_init, (tokenizer_path,)) as pool:
        pending: deque[tuple[int, Future[list[np.ndarray]]]] = deque()
        for batch in _batches(docs, batch_size):
            pending.append((len(batch), pool.submit(_worker_encode, batch)))
            if len(pending) >= 2 * num_workers:  # bounded: memory does not grow with the corpus
                n, fut = pending.popleft()
                yield n, fut.result()
        while pending:
            n, fut = pending.popleft()
            yield n, fut.result()


def write_shards(
    docs: Iterable[str],
    tokenizer_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    prefix: str = "shard",
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    num_workers: int = 1,
    batch_size: int = 256,
    show_progress: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Tokenize `docs` (EOS after each) into ``out_dir/PREFIX_NNNNN.ds`` shards.

    Returns the content of the ``dataset.json`` written to `out_dir`. `num_workers` > 1 tokenizes
    in that many processes; with 1, `tokenizers` still uses its own threads unless
    TOKENIZERS_PARALLELISM=false. Empty documents are skipped.
    """
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens must be >= 1, got {shard_tokens}")
    tokenizer_path = str(tokenizer_path)
    tok, eos = _prepare_tokenizer(tokenizer_path)
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    dtype = token_dtype(vocab_size)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stale = sorted(out.glob(f"{glob.escape(prefix)}_*{SHARD_SUFFIX}*"))
    if stale and not overwrite:
        raise FileExistsError(f"{out} already holds shards named {prefix}_*{SHARD_SUFFIX}")
    for p in [*stale, out / DATASET_JSON]:
        p.unlink(missing_ok=True)

    writer = _ShardWriter(out, prefix, dtype, shard_tokens, Path(tokenizer_path).name)
    total_docs = len(docs) if isinstance(docs, Sequence) else None
    n_docs = n_tokens = 0
    columns = [SpinnerColumn(), TextColumn("[progress.description]{task.description}")]
    columns += [TextColumn("{task.completed} docs"), TextColumn("{task.fields[tokens]} tokens")]
    columns += [TimeElapsedColumn()]
    with Progress(*columns, disable=not show_progress, transient=True) as progress:
        task = progress.add_task(f"tokenizing -> {out}", total=total_docs, tokens="0")
        for n, encoded in _encoded_batches(docs, tokenizer_path, batch_size, num_workers):
            for ids in encoded:
                writer.add(ids)
                n_tokens += len(ids)
            n_docs += n
            progress.update(task, advance=n, tokens=_human(n_tokens))
    writer.finish()
    return _write_meta(out, tokenizer_path, vocab_size, eos, dtype, n_tokens, n_docs, writer)


def _write_meta(
    out: Path, tokenizer_path: str, vocab_size: int, eos: int, dtype: np.dtype, n_tokens: int,
    n_docs: int, writer: _ShardWriter,
) -> dict[str, Any]:  # fmt: skip
    meta = {
        "format": "datatrove-ds",
        "version": FORMAT_VERSION,
        "tokenizer": tokenizer_path,
        "tokenizer_sha256": hashlib.sha256(Path(tokenizer_path).read_bytes()).hexdigest(),
        "vocab_size": vocab_size,
        "eos_id": eos,
        "dtype": dtype.name,
        "token_size": dtype.itemsize,
        "total_tokens": n_tokens,
        "num_docs": n_docs,
        "shards": writer.shards,
    }
    _write_atomic(out / DATASET_JSON, (json.dumps(meta, indent=2) + "\n").encode())
    return meta


def write_id_shards(
    docs: Iterable[np.ndarray],
    tokenizer_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    prefix: str = "shard",
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
) -> dict[str, Any]:
    """Shards of documents already tokenized (each array ends with its own EOS), in the layout
    of `write_shards`. For documents whose special tokens are placed by the caller (chat)."""
    tokenizer_path = str(tokenizer_path)
    tok, eos = _prepare_tokenizer(tokenizer_path)
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    dtype = token_dtype(vocab_size)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    writer = _ShardWriter(out, prefix, dtype, shard_tokens, Path(tokenizer_path).name)
    n_docs = n_tokens = 0
    for ids in docs:
        if len(ids) == 0:
            continue
        if int(ids.max()) >= vocab_size or int(ids.min()) < 0:
            raise ValueError(f"document {n_docs} has token ids outside the vocabulary")
        writer.add(ids)
        n_docs += 1
        n_tokens += len(ids)
    writer.finish()
    return _write_meta(out, tokenizer_path, vocab_size, eos, dtype, n_tokens, n_docs, writer)


# ----------------------------------------------------------------------------- reading


def _expand(spec: str | os.PathLike[str]) -> list[Path]:
    s = str(spec)
    p = Path(s)
    if p.is_dir():
        meta = p / DATASET_JSON
        if meta.is_file():  # our own writer: its shard list, in order
            return [p / sh["file"] for sh in json.loads(meta.read_text())["shards"]]
        return sorted(p.glob(f"*{SHARD_SUFFIX}"))
    if glob.has_magic(s):
        return [Path(x) for x in sorted(glob.glob(s)) if x.endswith(SHARD_SUFFIX)]
    if p.is_file():
        return [p]
    raise FileNotFoundError(f"no such shard file or directory: {p}")


def _read_token_size(path: Path) -> int | None:
    meta = path.with_name(path.name + ".metadata")
    if meta.is_file():
        first = (meta.read_text().splitlines() or [""])[0]
        tail = first.rsplit("|", 1)[-1]
        if tail in ("2", "4"):
            return int(tail)
    return None


def _index_token_size(path: Path) -> int | None:
    """Bytes per token implied by the document index (its last entry counts the shard's tokens),
    for shards without metadata: uint32 ids must not be read as twice as many uint16 ones."""
    idx = path.with_name(path.name + ".index")
    if not idx.is_file() or idx.stat().st_size < 8 or not path.is_file():
        return None
    with idx.open("rb") as f:
        f.seek(-8, os.SEEK_END)
        tokens = int(np.frombuffer(f.read(8), dtype="<u8")[0])
    nbytes = path.stat().st_size
    if tokens and nbytes in (2 * tokens, 4 * tokens):
        return nbytes // tokens
    raise ValueError(
        f"{path}: {nbytes} bytes for the {tokens} tokens its index counts; neither uint16 nor "
        "uint32 (a damaged or mismatched shard)"
    )


class ShardSet:
    """Read-only view of ``.ds`` shards as one token stream (numpy memmaps, nothing loaded).

    `paths`: a directory (uses its ``dataset.json`` shard list when present, else ``*.ds`` sorted),
    a glob, a ``.ds`` file, or a list of those. Shards are concatenated in that order.
    """

    def __init__(self, paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]):
        specs = [paths] if isinstance(paths, str | os.PathLike) else list(paths)
        files = [f for spec in specs for f in _expand(spec)]
        if not files:
            raise FileNotFoundError(
                f"no {SHARD_SUFFIX} shards found at {', '.join(map(str, specs))}"
            )
        for f in files:
            if not f.is_file():
                raise FileNotFoundError(f"shard listed but missing: {f}")
        self.paths: list[Path] = files
        self.meta: dict[str, Any] = {}
        parents = {f.parent for f in files}
        if len(parents) == 1 and (next(iter(parents)) / DATASET_JSON).is_file():
            self.meta = json.loads((next(iter(parents)) / DATASET_JSON).read_text())

        if "dtype" in self.meta:
            self.dtype = np.dtype(self.meta["dtype"]).newbyteorder("<")
        else:
            sizes = {_read_token_size(f) or _index_token_size(f) for f in files} - {None}
            if len(sizes) > 1:
                raise ValueError(f"shards mix token sizes {sorted(sizes)}: {specs}")
            self.dtype = np.dtype("<u4") if sizes == {4} else np.dtype("<u2")

        self._maps: list[np.ndarray] = []
        for f in files:
            nbytes = f.stat().st_size
            if nbytes % self.dtype.itemsize:
                raise ValueError(f"{f}: size {nbytes} is not a multiple of {self.dtype.itemsize}")
            # np.memmap cannot map an empty file; an empty shard contributes nothing anyway.
            mm = np.memmap(f, dtype=self.dtype, mode="r") if nbytes else np.empty(0, self.dtype)
            self._maps.append(mm)
        lengths = np.array([len(m) for m in self._maps], dtype=np.int64)
        self.shard_starts = np.concatenate([[0], np.cumsum(lengths)])  # len(paths) + 1 entries
        self._doc_ends: np.ndarray | None = None

    @property
    def vocab_size(self) -> int | None:
        return self.meta.get("vocab_size")

    @property
    def eos_id(self) -> int | None:
        return self.meta.get("eos_id")

    @property
    def num_tokens(self) -> int:
        return int(self.shard_starts[-1])

    total_tokens = num_tokens

    def __len__(self) -> int:
        return self.num_tokens

    @property
    def doc_ends(self) -> np.ndarray:
        """int64 end offset (exclusive, in tokens) of every document in the whole stream."""
        if self._doc_ends is None:
            parts = []
            for f, start, m in zip(self.paths, self.shard_starts, self._maps):
                idx = f.with_name(f.name + ".index")
                if not idx.is_file():
                    raise FileNotFoundError(f"document index missing: {idx}")
                ends = np.fromfile(idx, dtype="<u8").astype(np.int64)
                if len(ends) and ends[-1] != len(m):
                    raise ValueError(f"{idx}: last end {ends[-1]} != {len(m)} tokens in shard")
                parts.append(ends + start)
            self._doc_ends = np.concatenate(parts) if parts else np.empty(0, np.int64)
        return self._doc_ends

    @property
    def num_docs(self) -> int:
        return len(self.doc_ends)

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the concatenated stream as int64, across shard boundaries."""
        if not 0 <= start <= stop <= self.num_tokens:
            raise IndexError(f"token range [{start}, {stop}) outside [0, {self.num_tokens})")
        out = np.empty(stop - start, dtype=np.int64)
        i = int(np.searchsorted(self.shard_starts, start, side="right")) - 1
        pos = start
        while pos < stop:
            s0 = int(self.shard_starts[i])
            take = min(stop, int(self.shard_starts[i + 1])) - pos
            out[pos - start : pos - start + take] = self._maps[i][pos - s0 : pos - s0 + take]
            pos += take
            i += 1
        return out

    def __repr__(self) -> str:
        return f"ShardSet({len(self.paths)} shards, {self.num_tokens} tokens, {self.dtype.name})"
