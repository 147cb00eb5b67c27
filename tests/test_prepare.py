import json
from pathlib import Path

import pytest

import crucible.data.prepare as prepare_mod
from crucible.config import DataConfig
from crucible.data.prepare import prepare_data
from crucible.data.shards import ShardSet
from crucible.tokenizer.train import load_tokenizer

TINY = 0.3  # MB: a build takes about a second


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cfg = DataConfig(cache_dir=str(tmp_path_factory.mktemp("cache")), max_corpus_mb=TINY)
    return cfg, prepare_data(cfg, vocab_size=384, seq_len=32, quiet=True)


def test_tiny_build(built):
    cfg, data = built
    root = data.tokenizer_path.parent
    assert root.parent == Path(cfg.cache_dir) and root.name.startswith("stdlib-")
    assert load_tokenizer(data.tokenizer_path).get_vocab_size() == 384
    train, val = ShardSet(data.train_dir), ShardSet(data.val_dir)
    assert train.vocab_size == val.vocab_size == 384
    assert train.num_tokens > val.num_tokens > 33
    info = json.loads((root / "build.json").read_text())
    assert info["train_tokens"] == train.num_tokens and info["seconds"]["total"] > 0
    assert not [p for p in Path(cfg.cache_dir).iterdir() if p.name.startswith(".")]  # no tmp left


def test_second_call_reuses(built, monkeypatch):
    cfg, data = built

    def no_build(*args, **kwargs):
        raise AssertionError("rebuilt instead of reusing")

    monkeypatch.setattr(prepare_mod, "_build_stdlib", no_build)
    assert prepare_data(cfg, vocab_size=384, seq_len=32, quiet=True) == data


def test_too_small_vocab_fails_cleanly(tmp_path: Path):
    cfg = DataConfig(cache_dir=str(tmp_path), max_corpus_mb=TINY)
    with pytest.raises(ValueError, match="model.vocab_size 256 is too small"):
        prepare_data(cfg, vocab_size=256, seq_len=16, quiet=True)  # 256 bytes + 4 specials
    missing = cfg.model_copy(update={"tokenizer": str(tmp_path / "none.json")})
    with pytest.raises(FileNotFoundError, match="none.json"):
        prepare_data(missing, vocab_size=512, seq_len=16, quiet=True)
    assert list(tmp_path.iterdir()) == []  # nothing was built or left behind


def test_incomplete_build_is_redone(tmp_path: Path):
    cfg = DataConfig(cache_dir=str(tmp_path), max_corpus_mb=TINY)
    root = tmp_path / f"stdlib-{prepare_mod.cache_key(cfg, 300)}"
    (root / "train").mkdir(parents=True)  # what a half-copied cache might hold: no build.json
    (root / "train" / "junk.ds").write_bytes(b"\0\0")
    data = prepare_data(cfg, vocab_size=300, seq_len=16, quiet=True)
    assert data.tokenizer_path.parent == root and (root / "build.json").is_file()
    assert not (root / "train" / "junk.ds").exists()
    assert load_tokenizer(data.tokenizer_path).get_vocab_size() == 300  # never above the model's


def test_given_shards(built, tmp_path: Path):
    _, data = built
    ok = DataConfig(
        train_shards=str(data.train_dir),
        val_shards=str(data.val_dir),
        tokenizer=str(data.tokenizer_path),
    )
    assert prepare_data(ok, 384, 32) == data
    with pytest.raises(ValueError, match="data.val_shards must be set"):
        prepare_data(ok.model_copy(update={"val_shards": None}), 384, 32)
    with pytest.raises(ValueError, match="data.tokenizer must be set"):
        prepare_data(ok.model_copy(update={"tokenizer": None}), 384, 32)
    with pytest.raises(FileNotFoundError, match="missing-dir"):
        prepare_data(ok.model_copy(update={"train_shards": str(tmp_path / "missing-dir")}), 384, 32)
    with pytest.raises(ValueError, match=r"has 384 tokens but model.vocab_size is 300"):
        prepare_data(ok, 300, 32)
    with pytest.raises(ValueError, match="fewer than seq_len"):
        prepare_data(ok, 384, 10**9)


def test_given_tokenizer_is_used(built, tmp_path: Path):
    _, data = built
    cfg = DataConfig(
        cache_dir=str(tmp_path), max_corpus_mb=TINY, tokenizer=str(data.tokenizer_path)
    )
    mine = prepare_data(cfg, 512, 32, quiet=True)
    assert mine.tokenizer_path.read_bytes() == data.tokenizer_path.read_bytes()
    assert ShardSet(mine.train_dir).num_tokens == ShardSet(data.train_dir).num_tokens
