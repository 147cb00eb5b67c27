"""Word splitters per language, the denominator of fertility and continued-word metrics.

The default is a regular expression, so results never depend on what is installed: a word is a
run of letters/digits (``\\w+``), and a run of punctuation counts as a word of its own (as a word
tokenizer would emit it). French and Italian keep the elided article with its apostrophe
(``l'``, ``dell'``), as spaCy's rules for those languages do. When spaCy is installed, ``spacy``
uses its rule-based tokenizer for the language (``spacy.blank(lang)``: rules ship inside the pip
package, no model download).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import cache
from typing import Literal

WordSplitter = Callable[[str], list[str]]
Backend = Literal["auto", "regex", "spacy"]

DEFAULT_WORD_RE = r"\w+|[^\w\s]+"
# Elision: "l'homme" -> "l'", "homme"; the apostrophe belongs to the article.
_ELISION_RE = r"\w+['’](?=\w)|\w+|[^\w\s]+"
LANGUAGE_WORD_RE: dict[str, str] = {"fr": _ELISION_RE, "it": _ELISION_RE}


def regex_splitter(language: str | None = None) -> WordSplitter:
    pattern = re.compile(LANGUAGE_WORD_RE.get(language or "", DEFAULT_WORD_RE))
    return pattern.findall


@cache
def _spacy_splitter(language: str) -> WordSplitter | None:
    try:
        import spacy  # optional
    except ImportError:
        return None
    try:
        nlp = spacy.blank(language)
    except Exception:  # spaCy raises its own error types for unknown languages
        return None
    return lambda text: [t.text for t in nlp.tokenizer(text) if not t.is_space]


def word_splitter(language: str | None = None, backend: Backend = "auto") -> WordSplitter:
    """A function text -> words for `language` (ISO 639-1 code such as "en"; None: generic)."""
    if backend not in ("auto", "regex", "spacy"):
        raise ValueError(f"unknown word splitter backend {backend!r}")
    if backend != "regex" and language:
        spacy_split = _spacy_splitter(language)
        if spacy_split is not None:
            return spacy_split
        if backend == "spacy":
            raise ValueError(f"spaCy is not installed or has no tokenizer for {language!r}")
    return regex_splitter(language)


def splitter_name(language: str | None, backend: Backend = "auto") -> str:
    """Which splitter `word_splitter` picks, for reports."""
    if backend != "regex" and language and _spacy_splitter(language) is not None:
        return f"spacy:{language}"
    return f"regex:{language if language in LANGUAGE_WORD_RE else 'default'}"
