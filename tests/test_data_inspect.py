"""`crucible data inspect`: counts recomputed with the tokenizer directly, shares, samples,
the length histogram, and the tokenizer-vs-shard warnings."""

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from crucible.data.commands import register
from crucible.data.inspect import format_report, inspect_path, length_bins
from crucible.data.tokenize import tokenize_jsonl_files
from crucible.tokenizer.train import load_tokenizer, train_tokenizer

LANG_DIR = Path(__file__).parent / "fixtures" / "data" / "lang"


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="crucible")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def _paragraphs(lang: str) -> list[str]:
    return [p for p in (LANG_DIR / f"{lang}.txt").read_text().splitlines() if p.strip()]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("inspect")
    texts = [(LANG_DIR / f"{lang}.txt").read_text() for lang in ("en", "fr", "de")]
    tok = train_tokenizer(texts, 300, root / "tok", min_frequency=1)
    other = train_tokenizer(texts, 400, root / "other", min_frequency=1)
    files = []
    for lang in ("en", "fr"):
        f = root / f"{lang}.jsonl"
        f.write_text("".join(json.dumps({"text": p}) + "\n" for p in _paragraphs(lang)))
        files.append(f)
    tokenize_jsonl_files(files, tok, root / "shards", show_progress=False)
    return root, Path(tok), Path(other)


def test_shard_directory_counts_shares_and_samples(built):
    root, tok, _ = built
    ins = inspect_path(root / "shards", samples=2)
    assert ins.kind == "shards" and not ins.warnings
    enc = load_tokenizer(tok)
    total = 0
    for view, lang in zip(ins.sources, ("en", "fr")):
        paras = _paragraphs(lang)
        # Independent count: each document encoded alone plus its EOS.
        expected = [len(enc.encode(p, add_special_tokens=False).ids) + 1 for p in paras]
        assert view.name == lang and view.docs == len(paras)
        assert view.lengths.tolist() == expected
        assert len(view.samples) == 2 and all(s in paras for s in view.samples)
        assert view.tokenizer == str(tok)
        total += sum(expected)
    report = format_report(ins)
    share = ins.sources[0].total / total
    assert f"{share:.1%}" in report and "warning" not in report


def test_tokenizer_disagreements_warn(built, tmp_path):
    root, tok, other = built
    ins = inspect_path(root / "shards", tokenizer=other)
    assert len(ins.warnings) == 2  # one per source
    assert f"written with {tok}, not {other}" in ins.warnings[0]
    assert "vocab 384 vs 512" in ins.warnings[0]
    # The recorded tokenizer changes after the shards were written.
    copy = tmp_path / "shards"
    copy.mkdir()
    for f in (root / "shards" / "en").iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    meta = json.loads((copy / "dataset.json").read_text())
    moved = tmp_path / "tok.json"
    moved.write_text(tok.read_text().replace('"<|pad|>"', '"<|pad2|>"'))
    meta["tokenizer"] = str(moved)
    (copy / "dataset.json").write_text(json.dumps(meta))
    (w,) = inspect_path(copy).warnings
    assert "changed since" in w
    moved.unlink()
    (w,) = inspect_path(copy).warnings
    assert "no longer exists" in w


def test_jsonl_file_and_mixture(built, capsys, tmp_path):
    root, tok, _ = built
    paras = _paragraphs("en")
    ins = inspect_path(root / "en.jsonl")
    assert ins.kind == "jsonl" and ins.sources[0].unit == "bytes"
    assert ins.sources[0].lengths.tolist() == [len(p.encode()) for p in paras]
    ins = inspect_path(root / "en.jsonl", tokenizer=tok, max_docs=3)
    enc = load_tokenizer(tok)
    assert ins.capped and ins.sources[0].lengths.tolist() == [
        len(e.ids) for e in enc.encode_batch(paras[:3])
    ]
    plan = {"shards": "shards", "stages": [{"name": "s1", "tokens": 1e6,
                                            "weights": {"en": 3, "fr": 1}}]}  # fmt: skip
    (root / "mix.yaml").write_text(yaml.safe_dump(plan))
    out = tmp_path / "out"
    assert run(["data", "inspect", str(root / "mix.yaml"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "stage s1: en 75.0%, fr 25.0%" in printed and "histogram" in printed
    assert (out / "lengths.png").is_file() and [p.name for p in out.iterdir()] == ["lengths.png"]


def test_processed_directory_skips_the_removal_sample(tmp_path):
    (tmp_path / "web.jsonl").write_text('{"text": "kept"}\n{"text": "also kept"}\n')
    (tmp_path / "removed_sample.jsonl").write_text('{"text": "removed", "reason": "c4"}\n')
    (tmp_path / "stats.json").write_text(json.dumps({"outputs": ["web.jsonl"]}))
    ins = inspect_path(tmp_path)
    assert [(v.name, v.docs, v.total) for v in ins.sources] == [("web", 2, 13)]


def test_length_bins_and_bad_input(tmp_path):
    bins = length_bins(np.array([1, 2, 3, 4, 1000]))
    assert bins[:3] == [(0, 2, 1), (2, 4, 2), (4, 8, 1)]
    assert bins[-1] == (512, 1024, 1) and sum(c for *_, c in bins) == 5
    with pytest.raises(FileNotFoundError, match="no such file"):
        inspect_path(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no shards or .jsonl"):
        inspect_path(tmp_path)
    (tmp_path / "m.yaml").write_text("stages: []\n")
    with pytest.raises(ValueError, match="needs `shards: DIR`"):
        inspect_path(tmp_path / "m.yaml")
