"""Tokenizer lab defaults: the word splitter is an explicit, named choice whatever is installed,
and `--max-mb` caps the text read over all files of a corpus."""

import argparse
import json
import sys
import types
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from crucible.data.commands import _input_texts, register
from crucible.tokenizer import words
from crucible.tokenizer.metrics import evaluate_text
from crucible.tokenizer.words import regex_splitter, splitter_name, word_splitter

TEXT = "Hello, world! L'année (2026) was fine."


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="crucible")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def _byte_tokenizer_file(path: Path) -> Path:
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.save(str(path))
    return path


def _encode(texts):
    return [list(t.encode()) for t in texts]  # one token per UTF-8 byte


@pytest.fixture
def fake_spacy(monkeypatch):
    """An importable `spacy` whose blank tokenizer splits on single characters: if anything used
    it by default, word counts would show it."""

    class Tok:
        def __init__(self, text: str):
            self.text, self.is_space = text, text.isspace()

    blank = types.SimpleNamespace(tokenizer=lambda text: [Tok(c) for c in text])
    monkeypatch.setitem(sys.modules, "spacy", types.SimpleNamespace(blank=lambda lang: blank))
    words._spacy_splitter.cache_clear()
    yield
    words._spacy_splitter.cache_clear()


def test_default_is_regex_even_with_spacy_installed(fake_spacy):
    m = evaluate_text(_encode, TEXT, language="en")
    assert m.splitter == "regex:default"
    assert m.words == len(regex_splitter("en")(TEXT)) == 13  # ( and ) are words of their own
    spacy_m = evaluate_text(_encode, TEXT, language="en", backend="spacy")
    assert spacy_m.splitter == "spacy:en"
    assert spacy_m.words == len(TEXT.replace(" ", ""))  # the fake splits per character


def test_whitespace_and_regex_splitters():
    assert word_splitter("en", "whitespace")(TEXT) == TEXT.split()
    assert splitter_name("en", "whitespace") == "whitespace"
    assert word_splitter("fr")("L'année") == ["L'", "année"]
    assert splitter_name("fr") == "regex:fr" and splitter_name("de") == "regex:default"
    with pytest.raises(ValueError, match="allowed: regex, whitespace, spacy"):
        word_splitter("en", "auto")  # type: ignore[arg-type]


def test_spacy_missing_is_one_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "spacy", None)  # import spacy -> ImportError
    words._spacy_splitter.cache_clear()
    with pytest.raises(ValueError, match=r"spaCy is not installed \(pip install spacy\)"):
        word_splitter("en", "spacy")
    words._spacy_splitter.cache_clear()


def test_eval_names_the_splitter_in_table_and_json(tmp_path, capsys):
    tok = _byte_tokenizer_file(tmp_path / "bytes.json")
    (tmp_path / "en.txt").write_text(TEXT)
    for splitter, expected in (("regex", "regex:default"), ("whitespace", "whitespace")):
        out = tmp_path / splitter
        argv = ["tokenizer", "eval", f"b={tok}", f"--corpus=en={tmp_path / 'en.txt'}"]
        assert run([*argv, "--splitter", splitter, "--out", str(out)]) == 0
        printed = capsys.readouterr().out
        assert f"words split by: {expected}" in printed
        (row,) = json.loads((out / "tokenizer_metrics.json").read_text())
        assert row["splitter"] == expected
        assert row["words"] == len(word_splitter("en", splitter)(TEXT))


def _multibyte_text(n_bytes: int) -> str:
    line = "Grüße aus Köln, ça va très bien — 東京.\n"  # 1-, 2- and 3-byte characters
    return line * (n_bytes // len(line.encode()) + 1)


def test_max_mb_caps_one_big_file(tmp_path):
    big = tmp_path / "big.txt"
    big.write_text(_multibyte_text(2_900_000))
    assert big.stat().st_size > 2_900_000
    texts = list(_input_texts([str(big)], "text", 1.0))
    size = sum(len(t.encode()) for t in texts)
    assert 1_000_000 - 3 <= size <= 1_000_000  # cut at a character boundary
    assert big.read_text().startswith(texts[0])


def test_max_mb_is_a_cap_across_files_of_a_directory(tmp_path, capsys):
    d = tmp_path / "dir"
    d.mkdir()
    for i in range(3):
        (d / f"part{i}.txt").write_text(_multibyte_text(620_000))
    texts = list(_input_texts([str(d)], "text", 1.0))
    assert sum(len(t.encode()) for t in texts) <= 1_000_000
    assert len(texts) == 2  # the second file is cut, the third never read
    tok = _byte_tokenizer_file(tmp_path / "bytes.json")
    out = tmp_path / "eval"
    argv = ["tokenizer", "eval", f"b={tok}", f"--corpus=de={d}", "--max-mb", "1"]
    assert run([*argv, "--out", str(out)]) == 0
    (row,) = json.loads((out / "tokenizer_metrics.json").read_text())
    assert 999_000 < row["bytes"] <= 1_000_000  # joining newlines included in the cap
