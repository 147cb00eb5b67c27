"""Tokenizer quality metrics: fertility, continued words, bytes and characters per token.

Definitions (FineWeb2, Penedo et al. 2025; the playbook's tokenizer chapter):

* **fertility** = tokens per word, where each word is encoded *on its own*, without special
  tokens (the FineWeb2 protocol). A byte-level BPE then sees "word", not " word", so counts can
  differ slightly from in-context tokenization; this mode is used everywhere here.
* **proportion of continued words (PCW)** = share of words that need 2 or more tokens.
* **bytes per token** and **characters per token** = UTF-8 bytes (characters) of the whole text
  over the tokens of the whole text encoded in context. Fair within one language only: a CJK
  character is 3 bytes.

Counts are kept exact (integers), so every ratio can be recomputed by hand.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from tokenizers import Tokenizer

from crucible.tokenizer.train import load_tokenizer
from crucible.tokenizer.words import DEFAULT_BACKEND, Backend, splitter_name, word_splitter

Encoder = Callable[[list[str]], list[list[int]]]  # texts -> ids, no special tokens


@dataclass(frozen=True)
class TokenizerMetrics:
    tokenizer: str
    corpus: str
    language: str | None
    splitter: str
    words: int
    word_tokens: int  # tokens over all words, each word encoded alone
    continued_words: int  # words encoded as 2+ tokens
    bytes: int
    chars: int
    tokens: int  # tokens of the whole text, encoded in context

    @property
    def fertility(self) -> float:
        return self.word_tokens / self.words if self.words else 0.0

    @property
    def pcw(self) -> float:
        return self.continued_words / self.words if self.words else 0.0

    @property
    def bytes_per_token(self) -> float:
        return self.bytes / self.tokens if self.tokens else 0.0

    @property
    def chars_per_token(self) -> float:
        return self.chars / self.tokens if self.tokens else 0.0

    def as_dict(self) -> dict:
        out = asdict(self)
        out.update(
            fertility=self.fertility,
            pcw=self.pcw,
            bytes_per_token=self.bytes_per_token,
            chars_per_token=self.chars_per_token,
        )
        return out


def _from_tokenizers(tok: Tokenizer) -> Encoder:
    return lambda texts: [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]


def load_encoder(spec: str | os.PathLike[str]) -> tuple[str, Encoder]:
    """(display name, encoder) for a tokenizer.json, a directory holding one, or any local
    transformers tokenizer directory (never downloads: ``local_files_only``)."""
    p = Path(spec)
    if p.is_file():
        name = p.stem if p.name != "tokenizer.json" else p.parent.name
        return name, _from_tokenizers(load_tokenizer(p))
    if (p / "tokenizer.json").is_file():
        return p.name, _from_tokenizers(load_tokenizer(p / "tokenizer.json"))
    if p.is_dir():
        from transformers import AutoTokenizer  # slow import: only for non-tokenizers formats

        hf = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
        if getattr(hf, "is_fast", False):
            return p.name, _from_tokenizers(hf.backend_tokenizer)
        return p.name, lambda texts: [hf.encode(t, add_special_tokens=False) for t in texts]
    raise FileNotFoundError(f"tokenizer not found: {p} (a tokenizer.json or a directory)")


_WHITESPACE = re.compile(r"\s+")


def evaluate_text(
    encode: Encoder,
    text: str,
    *,
    tokenizer: str = "tokenizer",
    corpus: str = "text",
    language: str | None = None,
    backend: Backend = DEFAULT_BACKEND,
    collapse_whitespace: bool = False,
    batch_size: int = 4096,
) -> TokenizerMetrics:
    """Metrics of one tokenizer on one text. `collapse_whitespace` turns whitespace runs into
    one space first, so indentation does not dominate bytes/token on prose."""
    if collapse_whitespace:
        text = _WHITESPACE.sub(" ", text).strip()
    words = word_splitter(language, backend)(text)
    counts = Counter(words)
    # Each distinct word is encoded once and weighted by its frequency.
    unique = list(counts)
    word_tokens = continued = 0
    for i in range(0, len(unique), batch_size):
        batch = unique[i : i + batch_size]
        for word, ids in zip(batch, encode(batch)):
            word_tokens += len(ids) * counts[word]
            continued += counts[word] if len(ids) >= 2 else 0
    tokens = len(encode([text])[0]) if text else 0
    return TokenizerMetrics(
        tokenizer=tokenizer,
        corpus=corpus,
        language=language,
        splitter=splitter_name(language, backend),
        words=len(words),
        word_tokens=word_tokens,
        continued_words=continued,
        bytes=len(text.encode()),
        chars=len(text),
        tokens=tokens,
    )


@dataclass(frozen=True)
class EvalCorpus:
    name: str
    text: str
    language: str | None = None


def evaluate_tokenizers(
    tokenizers: Sequence[str | os.PathLike[str]],
    corpora: Sequence[EvalCorpus],
    backend: Backend = DEFAULT_BACKEND,
    collapse_whitespace: bool = False,
    names: Sequence[str | None] | None = None,
) -> list[TokenizerMetrics]:
    """One row per (tokenizer, corpus), tokenizers in the outer loop. `names` overrides the
    display names (by default the file stem or directory name)."""
    rows = []
    for i, spec in enumerate(tokenizers):
        name, encode = load_encoder(spec)
        name = (names[i] if names and names[i] else None) or name
        for c in corpora:
            rows.append(
                evaluate_text(
                    encode,
                    c.text,
                    tokenizer=name,
                    corpus=c.name,
                    language=c.language,
                    backend=backend,
                    collapse_whitespace=collapse_whitespace,
                )
            )
    return rows
