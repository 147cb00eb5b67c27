"""Word splitters per language, the denominator of fertility and continued-word metrics.

The word definition moves fertility a lot (docs/data.md), so the splitter is always an explicit
choice and never depends on what happens to be installed:

* ``regex`` (the default): a word is a run of letters/digits (``\\w+``), and a run of punctuation
  counts as a word of its own (as a word tokenizer would emit it). French and Italian keep the
  elided article with its apostrophe (``l'``, ``dell'``), as spaCy's rules for those languages do.
* ``whitespace``: ``str.split()``; punctuation stays attached to its word.
* ``spacy``: spaCy's rule-based tokenizer for the language (``spacy.blank(lang)``: the rules ship
  inside the pip package, no model download). An error when spaCy is not installed.

Every report names the splitter that ran (`splitter_name`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import cache
from typing import Literal, get_args

WordSplitter = Callable[[str], list[str]]
Backend = Literal["regex", "whitespace", "spacy"]
BACKENDS: tuple[str, ...] = get_args(Backend)
DEFAULT_BACKEND: Backend = "regex"

DEFAULT_WORD_RE = r"\w+|[^\w\s]+"
# Elision: "l'homme" -> "l'", "homme"; the apostrophe belongs to the article.
_ELISION_RE = r"\w+['’](?=\w)|\w+|[^\w\s]+"
LANGUAGE_WORD_RE: dict[str, str] = {"fr": _ELISION_RE, "it": _ELISION_RE}


def regex_splitter(language: str | None = None) -> WordSplitter:
    pattern = re.compile(LANGUAGE_WORD_RE.get(language or "", DEFAULT_WORD_RE))
    return pattern.findall


def _whitespace_split(text: str) -> list[str]:
    return text.split()


@cache
def _spacy_splitter(language: str) -> WordSplitter:
    try:
        import spacy  # optional
    except ImportError:
        raise ValueError("--splitter spacy: spaCy is not installed (pip install spacy)") from None
    try:
        nlp = spacy.blank(language)
    except Exception:  # spaCy raises its own error types for unknown languages
        raise ValueError(f"--splitter spacy: spaCy has no tokenizer for {language!r}") from None
    return lambda text: [t.text for t in nlp.tokenizer(text) if not t.is_space]


def _check(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown word splitter {backend!r} (allowed: {', '.join(BACKENDS)})")


def word_splitter(language: str | None = None, backend: Backend = DEFAULT_BACKEND) -> WordSplitter:
    """A function text -> words for `language` (ISO 639-1 code such as "en"; None: generic)."""
    _check(backend)
    if backend == "whitespace":
        return _whitespace_split
    if backend == "spacy":
        if not language:
            raise ValueError("--splitter spacy needs the corpus language (--lang LABEL=CODE)")
        return _spacy_splitter(language)
    return regex_splitter(language)


def splitter_name(language: str | None, backend: Backend = DEFAULT_BACKEND) -> str:
    """The splitter `word_splitter` uses, for reports: regex:fr, regex:default, whitespace,
    spacy:de."""
    _check(backend)
    if backend == "whitespace":
        return "whitespace"
    if backend == "spacy":
        return f"spacy:{language}"
    return f"regex:{language if language in LANGUAGE_WORD_RE else 'default'}"
