"""Language identification with langid.py's real model (no stub): six languages, pipeline step."""

import json
from pathlib import Path

import pytest
import yaml

pytest.importorskip("langid")

from crucible.data.langid import LanguageFilter, langid_classifier  # noqa: E402
from crucible.data.pipeline import build_step, load_pipeline, run_pipeline  # noqa: E402

LANG_DIR = Path(__file__).parent / "fixtures" / "data" / "lang"
LANGS = ("en", "fr", "de", "es", "it", "pt")


def paragraph(lang: str) -> str:
    return (LANG_DIR / f"{lang}.txt").read_text(encoding="utf-8")


@pytest.mark.parametrize("lang", LANGS)
def test_identifies_paragraph(lang):
    code, prob = langid_classifier()(paragraph(lang).replace("\n", " "))
    assert code == lang
    assert type(code) is str and type(prob) is float
    assert 0.99 <= prob <= 1.0  # normalised (norm_probs=True), not a log-probability


def test_identifies_single_sentences():
    classify = langid_classifier()
    for lang in LANGS:
        first = paragraph(lang).splitlines()[0]
        assert classify(first)[0] == lang, first


def test_probabilities_are_normalised():
    # Text with no n-gram the model knows gets langid's prior: its top class (en) at ~0.17,
    # a probability in [0, 1] rather than a log-probability, and below the 0.65 default.
    code, prob = langid_classifier()("1234 5678 -- 42")
    assert code == "en" and 0.1 < prob < 0.3


def test_classifier_is_loaded_once():
    assert langid_classifier() is langid_classifier()


def test_filter_keeps_and_names_reasons():
    f = LanguageFilter(("en", "fr"))
    assert f(paragraph("en")).keep and f(paragraph("fr")).keep
    assert f(paragraph("de")).reason == "language:de"
    assert f(paragraph("pt")).reason == "language:pt"
    assert f("1234 5678 -- 42").reason == "language:low_score"
    assert LanguageFilter(("en",), min_score=0.1)("1234 5678 -- 42").keep
    with pytest.raises(ValueError, match="min_score"):
        LanguageFilter(("en",), min_score=-1.0)


def test_language_step_in_pipeline(tmp_path):
    spec = {
        "sources": [{"name": "web", "kind": "text", "paths": [f"{LANG_DIR}/*.txt"]}],
        "steps": [{"language": {"languages": ["en", "fr"], "min_score": 0.65}}],
        "output": "out",
        "sample_per_reason": 1,
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(spec))
    stats = run_pipeline(load_pipeline(path), show_progress=False)

    assert stats["docs_in"] == 6 and stats["docs_out"] == 2
    assert stats["removed_by_reason"] == {f"language:{x}": 1 for x in ("de", "es", "it", "pt")}
    assert stats["steps"]["language"] == {"in": 6, "kept": 2}
    kept = [json.loads(line) for line in (tmp_path / "out" / "web.jsonl").read_text().splitlines()]
    assert sorted(Path(r["id"].split(":", 1)[1]).stem for r in kept) == ["en", "fr"]
    removed = [json.loads(x) for x in (tmp_path / "out" / "removed_sample.jsonl").open()]
    assert sorted(r["reason"] for r in removed) == [
        "language:de",
        "language:es",
        "language:it",
        "language:pt",
    ]


def test_language_step_needs_languages():
    with pytest.raises(ValueError, match="languages"):
        build_step("language", {"min_score": 0.5})
