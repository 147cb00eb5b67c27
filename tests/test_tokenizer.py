import json
from pathlib import Path

import numpy as np
import pytest

from crucible.data.corpora import iter_stdlib_documents
from crucible.tokenizer.train import (
    DEFAULT_SPECIAL_TOKENS,
    eos_id,
    load_tokenizer,
    token_byte_lengths,
    train_tokenizer,
)

SAMPLES = [
    "def add(a, b):\n    return a + b\n",
    "Plain English prose, with punctuation!",
    "naïve café — 日本語のテキスト 🙂 Ünïcödé",
    "\ttabs\n\n   and    spaces  \r\n",
    "a literal <|endoftext|> inside text",
]


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory) -> Path:
    texts = [d.text for d in iter_stdlib_documents("train", 200_000)] + SAMPLES
    return train_tokenizer(texts, 512, tmp_path_factory.mktemp("tok"))


def test_vocab_and_special_tokens(tok_path: Path):
    tok = load_tokenizer(tok_path)
    assert tok_path.name == "tokenizer.json"
    assert tok.get_vocab_size() == 512
    assert [tok.token_to_id(t) for t in DEFAULT_SPECIAL_TOKENS] == [0, 1, 2, 3]
    assert eos_id(tok) == 0


def test_rounding_and_padding(tmp_path: Path):
    p = train_tokenizer(["tiny corpus " * 10], 300, tmp_path / "t.json")
    assert p == tmp_path / "t.json"
    tok = load_tokenizer(p)
    assert tok.get_vocab_size() == 384  # rounded up to 128, padded with reserved specials
    assert tok.token_to_id("<|reserved_0|>") is not None
    tok = load_tokenizer(train_tokenizer(["tiny corpus"], 300, tmp_path / "u.json", round_to=1))
    assert tok.get_vocab_size() == 300
    with pytest.raises(ValueError, match="too small"):
        train_tokenizer(["x"], 200, tmp_path / "v.json", round_to=1)


def test_round_trip_and_byte_lengths(tok_path: Path):
    tok = load_tokenizer(tok_path)
    lengths = token_byte_lengths(tok)
    assert lengths.shape == (tok.get_vocab_size(),)
    assert (lengths[[tok.token_to_id(t) for t in DEFAULT_SPECIAL_TOKENS]] == 0).all()
    assert (lengths[4:260] >= 1).all()
    tok.encode_special_tokens = True  # literal special-token text stays text
    for text in SAMPLES:
        ids = tok.encode(text).ids
        assert tok.decode(ids, skip_special_tokens=False) == text
        assert int(lengths[np.array(ids)].sum()) == len(text.encode())


def test_transformers_loads_it(tok_path: Path):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_file=str(tok_path))
    raw = load_tokenizer(tok_path)
    for text in SAMPLES[:4]:
        ids = hf(text)["input_ids"]
        assert ids == raw.encode(text).ids
        assert hf.decode(ids) == text
    auto = AutoTokenizer.from_pretrained(str(tok_path.parent))
    assert auto.eos_token == "<|endoftext|>" and auto.eos_token_id == 0
    assert auto.pad_token == "<|pad|>"
    cfg = json.loads((tok_path.parent / "tokenizer_config.json").read_text())
    assert cfg["eos_token"] == "<|endoftext|>"


def test_missing_file_is_clear(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="nope"):
        load_tokenizer(tmp_path / "nope.json")
