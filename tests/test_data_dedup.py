"""Exact and MinHash dedup: the LSH curve, text simplification, streaming decisions."""

import random

import pytest

from crucible.data.dedup import (
    ExactDedup,
    MinHashDedup,
    jaccard,
    match_probability,
    shingles,
    simplify_text,
)


def random_doc(seed: int, n_words: int = 300) -> str:
    # Letters only: simplify_text maps every digit to 0.
    rng = random.Random(seed)
    return " ".join("".join(rng.choices("abcdefghij", k=6)) for _ in range(n_words))


def test_lsh_curve_defaults():
    # 1 - (1 - s^8)^14, the table in the datatrove notes.
    assert round(match_probability(0.8), 3) == 0.924
    assert round(match_probability(0.7), 3) == 0.565
    assert round(match_probability(0.5), 3) == 0.053
    assert match_probability(1.0) == 1.0 and match_probability(0.0) == 0.0


def test_simplify_and_shingles():
    assert simplify_text("Café, 2024!  Déjà-vu") == "cafe 0000 deja vu"
    assert shingles("a b c d e f", 5) == {"a b c d e", "b c d e f"}
    assert shingles("Too short", 5) == {"too short"}
    assert shingles("  ", 5) == set()
    assert jaccard({"a", "b"}, {"b", "c"}) == pytest.approx(1 / 3)


def test_exact_dedup():
    d = ExactDedup()
    assert [d.is_duplicate(t) for t in ["a b", "a b", "A  b", "c"]] == [False, True, False, False]
    n = ExactDedup(normalize=True)
    assert [n.is_duplicate(t) for t in ["Hello  World!", "hello world", "x"]] == [
        False,
        True,
        False,
    ]


def test_minhash_near_duplicates():
    a = random_doc(1)
    words = a.split()
    b = " ".join(words[:-3] + ["changed", "tail", "words"])  # 293 of 296 shingles shared
    c = random_doc(2)
    assert jaccard(shingles(a), shingles(b)) > 0.95
    assert jaccard(shingles(a), shingles(c)) == 0.0
    d = MinHashDedup()
    assert [d.is_duplicate(t) for t in (a, b, c)] == [False, True, False]


def test_minhash_chain_and_determinism():
    a = random_doc(3)
    words = a.split()
    b = " ".join(words[:150] + random_doc(4, 10).split() + words[150:])  # a + 10 words inserted
    c = " ".join(b.split()[:200] + random_doc(5, 10).split() + b.split()[200:])
    d = MinHashDedup()
    assert [d.is_duplicate(t) for t in (a, b, c)] == [False, True, True]
    s1, s2 = MinHashDedup().signature(a), MinHashDedup().signature(a)
    assert s1 is not None and s2 is not None and (s1 == s2).all()
    assert len(s1) == 14 * 8
    assert MinHashDedup().signature("!!!") is None
