"""The `tokenizer` and `data` commands, through their argparse wiring."""

import argparse
import json
from pathlib import Path

import pytest
import yaml

from crucible.data.commands import register

LANG_DIR = Path(__file__).parent / "fixtures" / "data" / "lang"


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="crucible")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_help_mentions_metrics(capsys):
    with pytest.raises(SystemExit):
        run(["tokenizer", "eval", "--help"])
    assert "fertility" in capsys.readouterr().out.lower()


def test_tokenizer_train_and_eval(tmp_path, capsys):
    assert run(["tokenizer", "train", str(LANG_DIR), "--out", str(tmp_path / "t"),
                "--vocab-size", "300", "--min-frequency", "1"]) == 0  # fmt: skip
    assert "384 tokens" in capsys.readouterr().out
    corpora = [f"--corpus={lang}={LANG_DIR / f'{lang}.txt'}" for lang in ("en", "fr")]
    out = tmp_path / "eval"
    assert run(["tokenizer", "eval", f"mine={tmp_path / 't'}", *corpora, "--out", str(out)]) == 0
    rows = json.loads((out / "tokenizer_metrics.json").read_text())
    assert [(r["tokenizer"], r["corpus"], r["language"]) for r in rows] == [
        ("mine", "en", "en"),
        ("mine", "fr", "fr"),
    ]
    assert (out / "tokenizer_metrics.png").is_file()


def test_data_tokenize_and_mixture(tmp_path, capsys):
    run(["tokenizer", "train", str(LANG_DIR), "--out", str(tmp_path / "t"), "--vocab-size", "300"])
    (tmp_path / "fr.jsonl").write_text(json.dumps({"text": (LANG_DIR / "fr.txt").read_text()}))
    (tmp_path / "en.jsonl").write_text(json.dumps({"text": (LANG_DIR / "en.txt").read_text()}))
    shards = tmp_path / "shards"
    files = [str(tmp_path / "en.jsonl"), str(tmp_path / "fr.jsonl")]
    tok = str(tmp_path / "t" / "tokenizer.json")
    assert run(["data", "tokenize", *files, "--tokenizer", tok, "--out", str(shards)]) == 0
    summary = json.loads((shards / "sources.json").read_text())
    assert set(summary["sources"]) == {"en", "fr"}
    plan = {
        "shards": "shards",
        "stages": [{"name": "one", "tokens": 10 * summary["sources"]["en"]["tokens"],
                    "weights": {"en": 0.5, "fr": 0.5}}],
    }  # fmt: skip
    (tmp_path / "mix.yaml").write_text(yaml.safe_dump(plan))
    capsys.readouterr()
    assert run(["data", "mixture", str(tmp_path / "mix.yaml")]) == 0
    out = capsys.readouterr().out
    assert "5.00" in out and "over the epoch ceiling" in out  # en: 5 epochs > 4
