"""Offline early-signal tasks built from the held-out (val) half of the embedded stdlib corpus.

Nothing is downloaded and no document here was seen in training (the corpus splits by file).
Every task is generated deterministically from `seed`, so two runs see the same questions.

  stdlib_next_line      code cloze: the true next line vs 3 lines of the same indentation drawn
                        from the same held-out file; random baseline 1/4
  stdlib_next_sentence  prose cloze on held-out docstrings and help() topics; baseline 1/4
  stdlib_docname        first docstring line -> the function's name among 4; baseline 1/4
  arithmetic            doctest-style `>>> 23 + 58` -> 81 vs 3 near misses; baseline 1/4
  arithmetic_gen        the same, generated greedily and compared as numbers; baseline ~0
  stdlib_bpb            bits-per-byte on held-out files (lower is better); baseline 8 bits
"""

from __future__ import annotations

import ast
import random
import re
import warnings
from collections.abc import Callable
from functools import cache

from crucible.evaluate.task import GenDoc, MCDoc, Task

N_CHOICES = 4
CONTEXT_LINES = 8


@cache
def _val_documents() -> tuple[tuple[str, str, str], ...]:
    from crucible.data.corpora import iter_stdlib_documents

    return tuple((d.source, d.id, d.text) for d in iter_stdlib_documents("val"))


def _indent(line: str) -> str:
    return line[: len(line) - len(line.lstrip())]


def next_line_docs(n: int, seed: int = 0) -> list[MCDoc]:
    """Code cloze: 8 lines of context, the next line among same-indentation distractors."""
    files = [t.splitlines() for s, _, t in _val_documents() if s == "stdlib-code"]
    candidates = [
        (f, i)
        for f, lines in enumerate(files)
        for i in range(CONTEXT_LINES, len(lines))
        if len(lines[i].strip()) >= 12 and not lines[i].lstrip().startswith("#")
    ]
    # Distractors share the file and the indentation: neither style nor layout gives them away.
    by_indent: dict[tuple[int, str], set[str]] = {}
    for f, i in candidates:
        line = files[f][i]
        by_indent.setdefault((f, _indent(line)), set()).add(line.strip())
    rng = random.Random(f"next_line:{seed}")
    docs: list[MCDoc] = []
    for f, i in rng.sample(candidates, len(candidates)):
        line = files[f][i]
        indent, true = _indent(line), line.strip()
        pool = sorted(by_indent[f, indent] - {true})
        if len(pool) < N_CHOICES - 1:
            continue
        context = "\n".join(files[f][i - CONTEXT_LINES : i]) + "\n" + indent
        docs.append(_shuffled(context, true, pool, rng, delimiter=""))
        if len(docs) == n:
            break
    return docs


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def next_sentence_docs(n: int, seed: int = 0) -> list[MCDoc]:
    """Prose cloze: up to 3 sentences of a paragraph, then its next sentence among others."""
    paragraphs = [
        " ".join(p.split())
        for s, _, t in _val_documents()
        if s != "stdlib-code"
        for p in t.split("\n\n")
    ]
    items, all_sentences = [], []
    for p in paragraphs:
        sents = [x for x in _SENTENCE_END.split(p) if 20 <= len(x) <= 200]
        all_sentences.extend(sents)
        items.extend((sents[max(0, j - 3) : j], sents[j]) for j in range(1, len(sents)))
    pool = sorted(set(all_sentences))
    rng = random.Random(f"next_sentence:{seed}")
    docs = []
    for ctx, true in rng.sample(items, min(n, len(items))):
        others = [x for x in pool if x != true and x not in ctx]
        docs.append(_shuffled(" ".join(ctx), true, others, rng))
    return docs


def docname_docs(n: int, seed: int = 0) -> list[MCDoc]:
    """`# <first docstring line>\\ndef` -> the function's name among names from held-out files."""
    pairs: dict[str, str] = {}
    for source, _, text in _val_documents():
        if source != "stdlib-code":
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tree = ast.parse(text)
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node) or ""
                summary = doc.strip().split("\n")[0].strip()
                if len(summary) >= 15 and not node.name.startswith("__"):
                    pairs.setdefault(node.name, summary)
    names = sorted(pairs)
    rng = random.Random(f"docname:{seed}")
    chosen = rng.sample(names, min(n, len(names)))
    return [
        _shuffled(f"# {pairs[name]}\ndef", name, [x for x in names if x != name], rng)
        for name in chosen
    ]


def arithmetic_pairs(n: int, seed: int = 0) -> list[tuple[str, int]]:
    rng = random.Random(f"arithmetic:{seed}")
    out = []
    for _ in range(n):
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        op = rng.choice("+-*" if a < 13 or b < 13 else "+-")
        out.append((f"{a} {op} {b}", {"+": a + b, "-": a - b, "*": a * b}[op]))
    return out


def arithmetic_docs(n: int, seed: int = 0) -> list[MCDoc]:
    rng = random.Random(f"arithmetic-choices:{seed}")
    docs = []
    for expr, value in arithmetic_pairs(n, seed):
        wrong = sorted({value + d for d in (-10, -2, -1, 1, 2, 10)} - {value})
        docs.append(_shuffled(f">>> {expr}\n", str(value), [str(w) for w in wrong], rng, ""))
    return docs


def arithmetic_gen_docs(n: int, seed: int = 0) -> list[GenDoc]:
    return [GenDoc(f">>> {e}\n", str(v)) for e, v in arithmetic_pairs(n, seed)]


def bpb_texts(n: int, seed: int = 0, max_chars: int = 4000) -> list[str]:
    """The first max_chars of up to n held-out documents (fixed order)."""
    return [t[:max_chars] for _, _, t in _val_documents()][:n]


def _shuffled(
    context: str, true: str, pool: list[str], rng: random.Random, delimiter: str = " "
) -> MCDoc:
    choices = [true, *rng.sample(pool, N_CHOICES - 1)]
    rng.shuffle(choices)
    return MCDoc(context, choices, choices.index(true), delimiter=delimiter, unconditional="")


# name -> (builder, main metric, random baseline, higher is better, description)
_SPECS: dict[str, tuple[Callable[[int, int], list], str, float, bool, str]] = {
    "stdlib_next_line": (next_line_docs, "acc_norm", 0.25, True, "code: true next line of 4"),
    "stdlib_next_sentence": (
        next_sentence_docs,
        "acc_norm",
        0.25,
        True,
        "prose: true next sentence of 4",
    ),
    "stdlib_docname": (docname_docs, "acc", 0.25, True, "docstring -> function name, of 4"),
    "arithmetic": (arithmetic_docs, "acc", 0.25, True, "doctest arithmetic, result of 4"),
    "arithmetic_gen": (arithmetic_gen_docs, "exact_match", 0.0, True, "doctest arithmetic, gen"),
    "stdlib_bpb": (bpb_texts, "bpb", 8.0, False, "bits-per-byte on held-out files"),
}
BUILTIN_SIZE = 200  # documents generated per task (a subset may use fewer)


def builtin_info(name: str) -> tuple[str, float, bool]:
    """(main metric, random baseline, higher is better) without building the task."""
    _, metric, baseline, higher, _ = _SPECS[name]
    return metric, baseline, higher


def build_builtin(name: str, n: int = BUILTIN_SIZE, seed: int = 0) -> Task:
    build, metric, baseline, higher, description = _SPECS[name]
    kind = "bpb" if name == "stdlib_bpb" else "gen" if name == "arithmetic_gen" else "mc"
    extra = {"stop": ["\n"], "max_new_tokens": 8} if kind == "gen" else {}
    return Task(
        name, kind, build(n, seed), baseline, description,  # type: ignore[arg-type]
        main_metric=metric, higher_is_better=higher, **extra,
    )  # fmt: skip


BUILTIN = list(_SPECS)
