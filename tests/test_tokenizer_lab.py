"""Tokenizer lab: training options and metrics on hand-computable examples and six languages."""

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from crucible.tokenizer.metrics import EvalCorpus, evaluate_text, evaluate_tokenizers, load_encoder
from crucible.tokenizer.report import bar_chart, metrics_table, write_json
from crucible.tokenizer.train import BOS_TOKEN, LAB_SPECIAL_TOKENS, load_tokenizer, train_tokenizer
from crucible.tokenizer.words import regex_splitter, word_splitter

LANG_DIR = Path(__file__).parent / "fixtures" / "data" / "lang"
LANGS = ("en", "fr", "de", "es", "it", "pt")


def _byte_tokenizer(merges: list[tuple[str, str]] = ()) -> Tokenizer:
    """Byte-level BPE with the 256 byte symbols and the given merges, nothing else."""
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=list(merges)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    return tok


def _encoder(tok: Tokenizer):
    return lambda texts: [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]


def test_metrics_bytes_only_tokenizer():
    # No merges: one token per UTF-8 byte. Words "the" (3 bytes) and "café" (5 bytes: é is 2).
    m = evaluate_text(_encoder(_byte_tokenizer()), "the café", language="en")
    assert (m.words, m.word_tokens, m.continued_words) == (2, 8, 2)
    assert m.fertility == 4.0 and m.pcw == 1.0
    assert (m.bytes, m.chars, m.tokens) == (9, 8, 9)  # the space is a byte too
    assert m.bytes_per_token == 1.0 and m.chars_per_token == pytest.approx(8 / 9)


def test_metrics_with_merges():
    # Merges t+h -> th, th+e -> the. Words: the, the, café, ! -> 1 + 1 + 5 + 1 = 8 tokens.
    tok = _byte_tokenizer([("t", "h"), ("th", "e")])
    m = evaluate_text(_encoder(tok), "the the café!", language="en")
    assert (m.words, m.word_tokens, m.continued_words) == (4, 8, 1)
    assert m.fertility == 2.0 and m.pcw == 0.25
    # In context: "the" | "Ġ" "the" | "Ġ" c a f Ã © | "!" = 1 + 2 + 6 + 1 = 10 tokens, 14 bytes.
    assert (m.bytes, m.chars, m.tokens) == (14, 13, 10)
    assert m.bytes_per_token == 1.4 and m.chars_per_token == 1.3


def test_metrics_word_level_tokenizer():
    tok = Tokenizer(models.WordLevel({"the": 0, "café": 1, "[UNK]": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    m = evaluate_text(_encoder(tok), "the café", language="en")
    assert m.fertility == 1.0 and m.pcw == 0.0
    assert m.tokens == 2 and m.bytes_per_token == 4.5 and m.chars_per_token == 4.0


def test_word_splitters():
    assert regex_splitter("en")("Hello, world!") == ["Hello", ",", "world", "!"]
    assert regex_splitter("fr")("L'année de l'édifice") == ["L'", "année", "de", "l'", "édifice"]
    assert regex_splitter("it")("dell'edificio") == ["dell'", "edificio"]
    assert word_splitter("de", backend="regex")("Bücher über") == ["Bücher", "über"]
    with pytest.raises(ValueError):
        word_splitter("en", backend="nope")  # type: ignore[arg-type]


def test_empty_text_gives_zero_metrics():
    m = evaluate_text(_encoder(_byte_tokenizer()), "")
    assert (m.words, m.tokens, m.fertility, m.pcw, m.bytes_per_token) == (0, 0, 0.0, 0.0, 0.0)


@pytest.fixture(scope="module")
def six_lang_tokenizer(tmp_path_factory) -> Path:
    texts = [(LANG_DIR / f"{lang}.txt").read_text() for lang in LANGS]
    out = tmp_path_factory.mktemp("lab-tok")
    return train_tokenizer(texts * 3, 600, out, special_tokens=LAB_SPECIAL_TOKENS)


def test_train_rounds_vocab_and_reserves_specials(six_lang_tokenizer):
    tok = load_tokenizer(six_lang_tokenizer)
    assert tok.get_vocab_size(with_added_tokens=True) == 640  # 600 rounded up to 5 x 128
    assert [tok.token_to_id(t) for t in LAB_SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    cfg = json.loads(six_lang_tokenizer.with_name("tokenizer_config.json").read_text())
    assert cfg["bos_token"] == BOS_TOKEN


def test_trained_tokenizer_loads_in_transformers(six_lang_tokenizer):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_file=str(six_lang_tokenizer))
    text = "La bibliothèque ouvre à 9 heures."
    assert fast.decode(fast.encode(text)) == text
    auto = AutoTokenizer.from_pretrained(str(six_lang_tokenizer.parent), local_files_only=True)
    assert auto.eos_token == "<|endoftext|>" and auto.bos_token == BOS_TOKEN
    assert auto.pad_token_id == 1


def test_split_digits(tmp_path):
    texts = ["1234 5678 1234 1234 year 2024 2024 2024"] * 50
    plain = load_tokenizer(train_tokenizer(texts, 300, tmp_path / "a", round_to=1))
    split = load_tokenizer(
        train_tokenizer(texts, 300, tmp_path / "b", round_to=1, split_digits=True)
    )
    assert len(plain.encode("1234").ids) == 1  # merged, frequent in training
    assert split.encode("1234").tokens == ["1", "2", "3", "4"]
    assert split.decode(split.encode("year 2024!").ids) == "year 2024!"


def test_six_languages(six_lang_tokenizer, tmp_path):
    corpora = [EvalCorpus(lang, (LANG_DIR / f"{lang}.txt").read_text(), lang) for lang in LANGS]
    byte_path = tmp_path / "bytes.json"
    _byte_tokenizer().save(str(byte_path))
    rows = evaluate_tokenizers(
        [six_lang_tokenizer, byte_path], corpora, backend="regex", names=["bpe640", None]
    )
    assert [(r.tokenizer, r.corpus) for r in rows][:2] == [("bpe640", "en"), ("bpe640", "fr")]
    assert {r.tokenizer for r in rows} == {"bpe640", "bytes"}
    by = {(r.tokenizer, r.corpus): r for r in rows}
    for lang in LANGS:
        text = (LANG_DIR / f"{lang}.txt").read_text()
        words = regex_splitter(lang)(text)
        byte_row = by["bytes", lang]
        # Bytes-only tokenizer: fertility is the mean UTF-8 length of a word.
        assert byte_row.word_tokens == sum(len(w.encode()) for w in words)
        assert byte_row.tokens == len(text.encode()) and byte_row.bytes_per_token == 1.0
        bpe = by["bpe640", lang]
        assert bpe.words == len(words)
        assert 1.0 <= bpe.fertility < byte_row.fertility
        assert 0.0 <= bpe.pcw <= 1.0 and bpe.bytes_per_token > 1.5
    # The report: a table with every row, JSON that round-trips, a PNG.
    assert metrics_table(rows).row_count == 12
    data = json.loads(write_json(rows, tmp_path / "m.json").read_text())
    assert data[0]["fertility"] == pytest.approx(rows[0].fertility)
    png = bar_chart(rows, tmp_path / "m.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_load_encoder_forms(six_lang_tokenizer):
    name, enc = load_encoder(six_lang_tokenizer.parent)  # a directory holding tokenizer.json
    assert name == six_lang_tokenizer.parent.name
    assert enc(["abc"])[0] == load_tokenizer(six_lang_tokenizer).encode("abc").ids
    with pytest.raises(FileNotFoundError):
        load_encoder("/nonexistent/tokenizer.json")
