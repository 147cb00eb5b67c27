"""Exact and MinHash near-duplicate removal, streaming: the first document of a group is kept.

MinHash follows datatrove's definitions, so its signatures can be compared with datatrove's
disk-based stages: word 5-gram shingles of a simplified text (lowercase, digits -> 0,
punctuation -> space, accents removed, whitespace collapsed), each hashed to 64 bits (the first
8 bytes of its SHA-1, little-endian), then 14 bands x 8 hashes = 112 permutations
``((h * a + b) mod 2^64) mod (2^61 - 1)`` with ``a``, ``b`` drawn from numpy's legacy
``RandomState(seed)`` in ``[1, 2^61 - 1)`` and ``[0, 2^61 - 1)`` (the arithmetic wraps at 64 bits
on purpose: with full-range ``a`` it mixes every bit of ``h``). Two documents are candidates when
any band is identical, which happens with probability ``1 - (1 - s^8)^14`` at Jaccard similarity
s: 0.924 at 0.8, 0.565 at 0.7, 0.053 at 0.5. Unlike datatrove's four disk-based stages
(signatures, buckets, union-find clusters, filter), this keeps the band index in memory and
decides as documents arrive: the bands of removed documents stay indexed, so a chain A ~ B ~ C
removes B and C, like datatrove's clusters. Memory is about 14 keys per document: fine for local
corpora; beyond, `data process --executor datatrove-local|slurm|ray` runs datatrove's stages with
these parameters (docs/data.md).
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass, field

import numpy as np

MERSENNE_61 = (1 << 61) - 1
_PUNCT = re.compile(r"[^\w\s]|_")
_DIGIT = re.compile(r"\d")
_SPACE = re.compile(r"\s+")


def simplify_text(text: str) -> str:
    """Lowercase, digits to 0, punctuation to space, no accents, single spaces."""
    text = unicodedata.normalize("NFD", text.lower())
    text = "".join(c for c in text if not unicodedata.combining(c))
    text = _DIGIT.sub("0", _PUNCT.sub(" ", text))
    return _SPACE.sub(" ", text).strip()


def match_probability(similarity: float, bands: int = 14, rows: int = 8) -> float:
    """Chance that two documents with this Jaccard similarity share at least one band."""
    return 1.0 - (1.0 - similarity**rows) ** bands


def shingles(text: str, n: int = 5) -> set[str]:
    """Word n-grams of the simplified text (a shorter text is one shingle)."""
    words = simplify_text(text).split()
    if len(words) < n:
        return {" ".join(words)} if words else set()
    return {" ".join(words[i : i + n]) for i in range(len(words) - n + 1)}


def jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


@dataclass
class ExactDedup:
    """Drops a document whose text (optionally simplified first) was seen before."""

    normalize: bool = False
    name: str = "exact_dedup"
    _seen: set[bytes] = field(default_factory=set, repr=False)

    def key(self, text: str) -> bytes:
        """What two duplicates share: 16 bytes of SHA-256 of the (simplified) text."""
        return hashlib.sha256((simplify_text(text) if self.normalize else text).encode()).digest()[
            :16
        ]

    def seen_or_add(self, key: bytes | None) -> bool:
        """True if `key` was seen before; else remember it."""
        if key is None:
            return False
        if key in self._seen:
            return True
        self._seen.add(key)
        return False

    def is_duplicate(self, text: str) -> bool:
        return self.seen_or_add(self.key(text))


@dataclass
class MinHashDedup:
    """Streaming MinHash LSH; `is_duplicate` also indexes the document."""

    n_grams: int = 5
    bands: int = 14
    rows: int = 8
    seed: int = 1
    name: str = "minhash_dedup"

    def __post_init__(self) -> None:
        if min(self.n_grams, self.bands, self.rows) < 1:
            raise ValueError("n_grams, bands and rows must be >= 1")
        rng = np.random.RandomState(self.seed)
        k = self.bands * self.rows
        self._a = rng.randint(1, MERSENNE_61, size=k, dtype=np.uint64)
        self._b = rng.randint(0, MERSENNE_61, size=k, dtype=np.uint64)
        self._buckets: list[set[bytes]] = [set() for _ in range(self.bands)]

    def signature(self, text: str) -> np.ndarray | None:
        """uint64[bands * rows] minimum hashes, or None for a text without words."""
        sh = shingles(text, self.n_grams)
        if not sh:
            return None
        digests = b"".join(hashlib.sha1(s.encode()).digest()[:8] for s in sorted(sh))
        h = np.frombuffer(digests, dtype="<u8").astype(np.uint64)
        sig = np.full(len(self._a), np.iinfo(np.uint64).max, dtype=np.uint64)
        with np.errstate(over="ignore"):
            for i in range(0, len(h), 4096):  # bounded [block, permutations] temporaries
                block = (h[i : i + 4096, None] * self._a + self._b) % np.uint64(MERSENNE_61)
                np.minimum(sig, block.min(axis=0), out=sig)
        return sig

    def key(self, text: str) -> bytes | None:
        """The signature as bytes (what `seen_or_add` needs), None for a text without words."""
        sig = self.signature(text)
        return None if sig is None else sig.tobytes()

    def seen_or_add(self, key: bytes | None) -> bool:
        """True if any band of the signature `key` was indexed before; indexes all its bands."""
        if key is None:
            return False
        width = self.rows * 8  # uint64 hashes
        keys = [key[i * width : (i + 1) * width] for i in range(self.bands)]
        dup = any(k in bucket for k, bucket in zip(keys, self._buckets))
        for k, bucket in zip(keys, self._buckets):
            bucket.add(k)
        return dup

    def is_duplicate(self, text: str) -> bool:
        return self.seen_or_add(self.key(text))
