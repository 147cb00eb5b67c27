"""Quality filters with documented thresholds: Gopher, C4, FineWeb and span-repetition rules.

Each filter is a callable ``text -> FilterResult``: ``keep`` False with a ``reason`` (a stable
string such as ``gopher_quality:below_min_words``) to drop the document, or keep it, possibly with
modified text (the C4 line filter removes lines). The rules and defaults follow datatrove
(commit a649de79, summarised in shared/anchors/posttrain-eval-data-tools.md section 3.7), which
follows the Gopher (Rae et al. 2021, Table A1), C4 (Raffel et al. 2020) and FineWeb papers.
Words come from a regex splitter (``\\w+`` runs and punctuation runs), not NLTK: the results differ
from datatrove's by the word tokenizer only, and need no downloaded data.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

import numpy as np

from crucible.tokenizer.words import regex_splitter

_split_words = regex_splitter()
PUNCTUATION = frozenset("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~«»“”‘’„…—–·•")
STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})
TERMINAL_PUNCT = (".", "?", "!", '"', "'", "”", "’", "。", "！", "？")


@dataclass(frozen=True)
class FilterResult:
    keep: bool
    reason: str | None = None
    text: str | None = None  # a modified text to continue with (None: unchanged)


KEEP = FilterResult(True)


def _drop(name: str, why: str) -> FilterResult:
    return FilterResult(False, f"{name}:{why}")


@dataclass(frozen=True)
class GopherQuality:
    """Gopher quality rules (Rae et al. 2021)."""

    min_doc_words: int = 50
    max_doc_words: int = 100_000
    min_avg_word_length: float = 3
    max_avg_word_length: float = 10
    max_symbol_word_ratio: float = 0.1  # "#" and "..." / "…" per word
    max_bullet_lines_ratio: float = 0.9
    max_ellipsis_lines_ratio: float = 0.3
    min_alpha_words_ratio: float = 0.8  # datatrove calls it max_non_alpha_words_ratio
    min_stop_words: int = 2
    name: str = "gopher_quality"

    def __call__(self, text: str) -> FilterResult:
        words = _split_words(text)
        n = len(words)
        real = [w for w in words if any(c not in PUNCTUATION for c in w)]
        if len(real) < self.min_doc_words:
            return _drop(self.name, "below_min_words")
        if len(real) > self.max_doc_words:
            return _drop(self.name, "above_max_words")
        avg = sum(len(w) for w in real) / len(real)
        if avg < self.min_avg_word_length:
            return _drop(self.name, "below_avg_word_length")
        if avg > self.max_avg_word_length:
            return _drop(self.name, "above_avg_word_length")
        if text.count("#") / n > self.max_symbol_word_ratio:
            return _drop(self.name, "hash_ratio")
        if (text.count("...") + text.count("…")) / n > self.max_symbol_word_ratio:
            return _drop(self.name, "ellipsis_ratio")
        lines = text.splitlines() or [""]
        bullets = sum(ln.lstrip().startswith(("•", "-")) for ln in lines)
        if bullets / len(lines) > self.max_bullet_lines_ratio:
            return _drop(self.name, "bullet_lines")
        ellipsis = sum(ln.rstrip().endswith(("...", "…")) for ln in lines)
        if ellipsis / len(lines) > self.max_ellipsis_lines_ratio:
            return _drop(self.name, "ellipsis_lines")
        if sum(any(c.isalpha() for c in w) for w in words) / n < self.min_alpha_words_ratio:
            return _drop(self.name, "alpha_words")
        if len(STOP_WORDS.intersection(w.lower() for w in words)) < self.min_stop_words:
            return _drop(self.name, "stop_words")
        return KEEP


def _duplicates(items: list[str]) -> tuple[int, int]:
    """(count, characters) of items that repeat an earlier item."""
    seen: set[str] = set()
    n = chars = 0
    for x in items:
        if x in seen:
            n += 1
            chars += len(x)
        else:
            seen.add(x)
    return n, chars


def _top_ngram_chars(words: list[str], n: int) -> int:
    grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    if not grams:
        return 0
    gram, count = grams.most_common(1)[0]
    return sum(len(w) for w in gram) * count


def _dup_ngram_chars(words: list[str], n: int) -> int:
    """Characters in n-grams that repeat an earlier n-gram; greedy and non-overlapping."""
    seen: set[tuple[str, ...]] = set()
    chars = i = 0
    while i <= len(words) - n:
        gram = tuple(words[i : i + n])
        if gram in seen:
            chars += sum(len(w) for w in gram)
            i += n
        else:
            seen.add(gram)
            i += 1
    return chars


@dataclass(frozen=True)
class GopherRepetition:
    """Gopher repetition rules (Rae et al. 2021, Table A1)."""

    dup_para_frac: float = 0.30
    dup_para_char_frac: float = 0.20
    dup_line_frac: float = 0.30
    dup_line_char_frac: float = 0.20
    top_ngram_char_frac: tuple[tuple[int, float], ...] = ((2, 0.20), (3, 0.18), (4, 0.16))
    dup_ngram_char_frac: tuple[tuple[int, float], ...] = (
        (5, 0.15),
        (6, 0.14),
        (7, 0.13),
        (8, 0.12),
        (9, 0.11),
        (10, 0.10),
    )
    name: str = "gopher_repetition"

    def __call__(self, text: str) -> FilterResult:
        size = max(1, len(text))
        paras = [p for p in re.split(r"\n{2,}", text.strip()) if p]
        n, chars = _duplicates(paras)
        if paras and n / len(paras) > self.dup_para_frac:
            return _drop(self.name, "dup_para_frac")
        if chars / size > self.dup_para_char_frac:
            return _drop(self.name, "dup_para_char_frac")
        lines = [ln for ln in re.split(r"\n+", text) if ln]
        n, chars = _duplicates(lines)
        if lines and n / len(lines) > self.dup_line_frac:
            return _drop(self.name, "dup_line_frac")
        if chars / size > self.dup_line_char_frac:
            return _drop(self.name, "dup_line_char_frac")
        words = _split_words(text)
        for n_, limit in self.top_ngram_char_frac:
            if _top_ngram_chars(words, n_) / size > limit:
                return _drop(self.name, f"top_{n_}_gram")
        for n_, limit in self.dup_ngram_char_frac:
            if _dup_ngram_chars(words, n_) / size > limit:
                return _drop(self.name, f"duplicated_{n_}_n_grams")
        return KEEP


_CITATION = re.compile(r"\[\d*\]|\[edit\]|\[citation needed\]", re.IGNORECASE)
_POLICY = (
    "terms of use",
    "privacy policy",
    "cookie policy",
    "uses cookies",
    "use of cookies",
    "use cookies",
)


@dataclass(frozen=True)
class C4Lines:
    """C4 rules: drop bad lines, then the document if too little is left."""

    max_word_length: int = 1000
    filter_no_terminal_punct: bool = True  # the FineWeb pipeline turns this off
    min_words_per_line: int = 3
    min_sentences: int = 5
    name: str = "c4"

    def __call__(self, text: str) -> FilterResult:
        lower = text.lower()
        if "lorem ipsum" in lower:
            return _drop(self.name, "lorem_ipsum")
        if "{" in text:
            return _drop(self.name, "curly_bracket")
        kept = []
        sentences = 0
        for line in text.splitlines():
            line = _CITATION.sub("", line.strip())
            words = line.split()
            if not words or max(len(w) for w in words) > self.max_word_length:
                continue
            if self.filter_no_terminal_punct and (
                not line.endswith(TERMINAL_PUNCT) or line.endswith("...")
            ):
                continue
            if len(words) < self.min_words_per_line:
                continue
            low = line.lower()
            if "javascript" in low or any(p in low for p in _POLICY):
                continue
            sentences += len(re.findall(r"[.!?]+(?:\s|$)", line)) or 1
            kept.append(line)
        if sentences < self.min_sentences:
            return _drop(self.name, "too_few_sentences")
        return FilterResult(True, text="\n".join(kept))


@dataclass(frozen=True)
class FineWebQuality:
    """FineWeb's line-level rules (Penedo et al. 2024)."""

    line_punct_thr: float = 0.12
    short_line_thr: float = 0.67
    short_line_length: int = 30
    char_duplicates_ratio: float = 0.01
    new_line_ratio: float = 0.3
    name: str = "fineweb_quality"

    def __call__(self, text: str) -> FilterResult:
        lines = [ln for ln in text.split("\n") if ln.strip()]
        if not lines:
            return _drop(self.name, "empty")
        if sum(ln.rstrip().endswith(TERMINAL_PUNCT) for ln in lines) / len(lines) < (
            self.line_punct_thr
        ):
            return _drop(self.name, "line_punct_ratio")
        short = sum(len(ln) <= self.short_line_length for ln in lines)
        if short / len(lines) > self.short_line_thr:
            return _drop(self.name, "short_line_ratio")
        _, dup_chars = _duplicates(lines)
        if dup_chars / max(1, len(text.replace("\n", ""))) > self.char_duplicates_ratio:
            return _drop(self.name, "char_dup_ratio")
        if text.count("\n") / max(1, len(_split_words(text))) > self.new_line_ratio:
            return _drop(self.name, "list_ratio")
        return KEEP


def max_span_repeats(tokens: list[str], max_n: int) -> tuple[int, int]:
    """(repeats, n): the most back-to-back copies of any span of 1..max_n tokens.

    A span of length n repeated r times back to back is a run of ``(r - 1) * n`` positions where
    ``tokens[i] == tokens[i + n]``; so a run of L such positions means ``L // n + 1`` copies.
    """
    if not tokens:
        return 0, 0
    ids = np.unique(np.asarray(tokens, dtype=object).astype(str), return_inverse=True)[1]
    best, best_n = 1, 1
    for n in range(1, min(max_n, len(ids) - 1) + 1):
        edges = np.diff(np.concatenate([[0], (ids[:-n] == ids[n:]).astype(np.int8), [0]]))
        runs = np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1)
        if len(runs) and int(runs.max()) // n + 1 > best:
            best, best_n = int(runs.max()) // n + 1, n
    return best, best_n


@dataclass(frozen=True)
class SpanRepeats:
    """Drop documents with `max_repeats` or more back-to-back copies of a 1..`max_n` token span
    (OLMo 2's repetition filter: 32 repeats, spans of 1-13 tokens). Tokens are words here."""

    max_repeats: int = 32
    max_n: int = 13
    name: str = "span_repeats"

    def __call__(self, text: str) -> FilterResult:
        repeats, n = max_span_repeats(_split_words(text), self.max_n)
        if repeats >= self.max_repeats:
            return _drop(self.name, f"{n}_token_span")
        return KEEP
