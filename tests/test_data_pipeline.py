"""`data process`: filters + dedup from a YAML file, counts by reason, samples, shards."""

import json
import random
from pathlib import Path

import pytest
import yaml

from crucible.data.corpora import Document
from crucible.data.dedup import ExactDedup
from crucible.data.filters import GopherQuality
from crucible.data.langid import LanguageFilter
from crucible.data.pipeline import build_step, load_pipeline, process_documents, run_pipeline
from crucible.data.shards import ShardSet
from crucible.tokenizer.train import train_tokenizer

STOP = ["the", "and", "of", "to", "with"]


def good_doc(seed: int, n_words: int = 120) -> str:
    """English-looking text that passes the Gopher rules; different seeds share no 5-grams."""
    rng = random.Random(seed)
    words = []
    for i in range(n_words):
        words.append(STOP[i % 5] if i % 4 == 0 else "".join(rng.choices("abcdefghij", k=6)))
    lines = [" ".join(words[i : i + 12]) + "." for i in range(0, n_words, 12)]
    return "\n".join(lines)


def write_jsonl(path: Path, texts: list[str]) -> None:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))


@pytest.fixture
def pipeline_file(tmp_path) -> Path:
    web = [good_doc(1), good_doc(2), good_doc(1), "too short to keep", good_doc(3)]
    near = good_doc(2).split()
    near[5] = "changed"
    web.append(" ".join(near[:-1]) + " x.")  # a near duplicate of good_doc(2)
    write_jsonl(tmp_path / "web.jsonl", web)
    (tmp_path / "books").mkdir()
    (tmp_path / "books" / "a.txt").write_text(good_doc(4))
    (tmp_path / "books" / "b.txt").write_text(" ".join(["spam eggs"] * 40))
    texts = [good_doc(i) for i in range(10, 30)]
    train_tokenizer(texts, 384, tmp_path / "tok")
    spec = {
        "sources": [
            {"name": "web", "kind": "jsonl", "paths": ["web.jsonl"]},
            {"name": "books", "kind": "text", "paths": ["books/*.txt"]},
        ],
        "steps": [
            {"span_repeats": {}},
            {"gopher_quality": {"min_doc_words": 50}},
            {"exact_dedup": None},
            {"minhash_dedup": {"bands": 14, "rows": 8}},
        ],
        "output": "out",
        "sample_per_reason": 1,
        "tokenize": {"tokenizer": "tok/tokenizer.json", "out": "shards", "workers": 1},
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_run_pipeline(pipeline_file):
    cfg = load_pipeline(pipeline_file)
    stats = run_pipeline(cfg, show_progress=False)
    out = pipeline_file.parent / "out"
    assert stats["docs_in"] == 8 and stats["docs_out"] == 4
    assert stats["removed_by_reason"] == {
        "exact_dedup": 1,
        "gopher_quality:below_min_words": 1,
        "minhash_dedup": 1,
        "span_repeats:2_token_span": 1,  # "spam eggs" x 40
    }
    assert stats["sources"]["web"]["docs_in"] == 6 and stats["sources"]["web"]["docs_out"] == 3
    assert stats["sources"]["books"]["removed"] == {"span_repeats:2_token_span": 1}
    assert stats["steps"]["span_repeats"] == {"in": 8, "kept": 7}
    kept = [json.loads(x) for x in (out / "web.jsonl").read_text().splitlines()]
    assert [k["text"] for k in kept] == [good_doc(1), good_doc(2), good_doc(3)]
    assert {k["source"] for k in kept} == {"web"}
    sample = [json.loads(x) for x in (out / "removed_sample.jsonl").read_text().splitlines()]
    assert sorted(s["reason"] for s in sample) == sorted(stats["removed_by_reason"])
    assert json.loads((out / "stats.json").read_text())["docs_out"] == 4
    # Per-source shards, one document each kept document, EOS-terminated.
    web = ShardSet(pipeline_file.parent / "shards" / "web")
    assert web.num_docs == 3 and web.dtype.name == "uint16"
    ends = web.doc_ends
    assert web.read(int(ends[0]) - 1, int(ends[0]))[0] == web.eos_id
    summary = json.loads((pipeline_file.parent / "shards" / "sources.json").read_text())
    assert summary["sources"]["books"]["docs"] == 1


def test_pipeline_errors(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text(yaml.safe_dump({"sources": [], "output": "o"}))
    with pytest.raises(ValueError):
        load_pipeline(bad)
    bad.write_text(
        yaml.safe_dump(
            {"sources": [{"name": "a", "kind": "text", "paths": ["x"]}], "steps": [{"nope": {}}]}
            | {"output": "o"}
        )
    )
    with pytest.raises(ValueError, match="unknown step"):
        load_pipeline(bad)
    with pytest.raises(ValueError, match="unknown option"):
        build_step("c4", {"min_sentence": 3})
    with pytest.raises(FileNotFoundError):
        load_pipeline(tmp_path / "missing.yaml")


def test_reservoir_is_seeded_and_bounded():
    docs = [Document(f"short {i}", "s", f"s:{i}") for i in range(50)]
    steps = [GopherQuality(), ExactDedup()]
    _, stats, sample1 = process_documents(docs, steps, sample_per_reason=3, seed=7)
    _, _, sample2 = process_documents(docs, [GopherQuality()], sample_per_reason=3, seed=7)
    assert stats["removed_by_reason"] == {"gopher_quality:below_min_words": 50}
    assert len(sample1) == 3 and sample1 == sample2


def test_language_filter_with_stub_classifier():
    f = LanguageFilter(("en", "fr"), min_score=0.65, classify=lambda t: (t[:2], 0.9))
    assert f("en text").keep and f("fr texte").keep
    assert f("de Text").reason == "language:de"
    low = LanguageFilter(("en",), classify=lambda t: ("en", 0.5))
    assert low("hello").reason == "language:low_score"
