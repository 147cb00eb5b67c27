import json
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from crucible.data.shards import ShardSet, token_dtype, write_shards
from crucible.tokenizer.train import load_tokenizer, train_tokenizer

DOCS = [
    "first document\n",
    "def f(x):\n    return x * 2\n",
    "",  # skipped: an empty document would be a lone EOS
    "naïve café — 日本語 🙂",
    "a literal <|endoftext|> must stay text",
    *[f"document number {i} with some words {'x' * (i % 7)}" for i in range(40)],
]
KEPT = [d for d in DOCS if d]


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory) -> Path:
    return train_tokenizer(KEPT * 3, 384, tmp_path_factory.mktemp("tok"))


def _independent_read(paths: list[Path], dtype: str) -> list[np.ndarray]:
    """A reader that knows only the .ds layout: raw tokens + uint64 token end offsets."""
    docs = []
    for p in paths:
        tokens = np.fromfile(p, dtype=dtype)
        ends = np.fromfile(str(p) + ".index", dtype="<u8")
        assert ends[-1] == len(tokens)
        starts = np.concatenate([np.zeros(1, ends.dtype), ends[:-1]])
        docs += [tokens[s:e] for s, e in zip(starts, ends)]
    return docs


def test_round_trip_multi_shard(tok_path: Path, tmp_path: Path):
    meta = write_shards(DOCS, tok_path, tmp_path, "train", shard_tokens=100, show_progress=False)
    tok = load_tokenizer(tok_path)
    eos = tok.token_to_id("<|endoftext|>")
    assert meta["num_docs"] == len(KEPT) and meta["dtype"] == "uint16"
    assert meta["vocab_size"] == 384 and meta["eos_id"] == eos
    assert len(meta["shards"]) > 2
    assert json.loads((tmp_path / "dataset.json").read_text()) == meta

    paths = [tmp_path / s["file"] for s in meta["shards"]]
    docs = _independent_read(paths, "<u2")
    assert len(docs) == len(KEPT)
    for ids, text in zip(docs, KEPT):
        assert ids[-1] == eos and eos not in ids[:-1]  # EOS appended, never injected by text
        assert tok.decode(ids[:-1].tolist(), skip_special_tokens=False) == text
    for p, s in zip(paths, meta["shards"]):
        first, count, _ = p.with_name(p.name + ".metadata").read_text().splitlines()
        assert first.endswith("|2") and int(count) == s["tokens"]

    shards = ShardSet(tmp_path)
    assert shards.paths == paths and shards.vocab_size == 384 and shards.eos_id == eos
    stream = np.concatenate(docs).astype(np.int64)
    assert shards.num_tokens == len(stream) == meta["total_tokens"]
    assert np.array_equal(shards.doc_ends, np.cumsum([len(d) for d in docs]))
    b = int(shards.shard_starts[1])  # a read across the first shard boundary
    assert np.array_equal(shards.read(b - 5, b + 7), stream[b - 5 : b + 7])
    assert np.array_equal(shards.read(0, len(stream)), stream)
    with pytest.raises(IndexError):
        shards.read(0, len(stream) + 1)
    # globs and explicit file lists work too
    assert ShardSet(str(tmp_path / "*.ds")).num_tokens == len(stream)
    assert ShardSet(paths[:1]).num_tokens == meta["shards"][0]["tokens"]


def test_workers_give_identical_output(tok_path: Path, tmp_path: Path):
    write_shards(DOCS, tok_path, tmp_path / "a", "s", shard_tokens=150, show_progress=False)
    write_shards(
        iter(DOCS), tok_path, tmp_path / "b", "s", shard_tokens=150, num_workers=2, batch_size=8
    )
    for p in sorted((tmp_path / "a").glob("s_*")):
        assert p.read_bytes() == (tmp_path / "b" / p.name).read_bytes()


def test_refuses_to_mix_with_existing_shards(tok_path: Path, tmp_path: Path):
    write_shards(DOCS, tok_path, tmp_path, "x", shard_tokens=50, show_progress=False)
    with pytest.raises(FileExistsError, match="x_"):
        write_shards(DOCS, tok_path, tmp_path, "x", show_progress=False)
    meta = write_shards(DOCS[:2], tok_path, tmp_path, "x", overwrite=True, show_progress=False)
    assert len(list(tmp_path.glob("x_*.ds"))) == len(meta["shards"]) == 1


def test_dtype_selection():
    assert token_dtype(4096) == np.dtype("<u2")
    assert token_dtype(65536) == np.dtype("<u2")  # ids 0..65535 still fit
    assert token_dtype(65537) == np.dtype("<u4")


def test_large_vocab_uses_uint32(tmp_path: Path):
    # A byte-level BPE whose byte tokens sit above 65535, so real ids need 32 bits.
    filler = {f"<unused{i}>": i for i in range(70_000)}
    alphabet = {c: 70_000 + i for i, c in enumerate(pre_tokenizers.ByteLevel.alphabet())}
    tok = Tokenizer(models.BPE(vocab={**filler, **alphabet}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>"])
    tok.save(str(tmp_path / "big.json"))
    docs = ["héllo wörld", "another one"]
    meta = write_shards(docs, tmp_path / "big.json", tmp_path / "ds", "big", show_progress=False)
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == 70_257
    read = _independent_read([tmp_path / "ds" / "big_00000.ds"], "<u4")
    assert read[0].max() >= 70_000
    assert [tok.decode(d[:-1].tolist()) for d in read] == docs
    shards = ShardSet(tmp_path / "ds")
    assert shards.dtype == np.dtype("<u4")
    assert np.array_equal(shards.read(0, shards.num_tokens), np.concatenate(read))


def test_foreign_shards_without_dataset_json(tok_path: Path, tmp_path: Path):
    write_shards(DOCS, tok_path, tmp_path, "f", shard_tokens=100, show_progress=False)
    (tmp_path / "dataset.json").unlink()
    shards = ShardSet(tmp_path)  # datatrove output: dtype from .ds.metadata, no vocab info
    assert shards.vocab_size is None and shards.dtype == np.dtype("<u2")
    assert shards.num_docs == len(KEPT)


def test_missing_or_empty_is_clear(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "absent")):
        ShardSet(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no .ds shards found at .*empty"):
        ShardSet(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no .ds shards"):
        ShardSet(str(tmp_path / "nothing-*.ds"))
