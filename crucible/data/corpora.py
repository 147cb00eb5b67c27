"""The embedded default corpus: the Python standard library, present wherever Python is.

Three sources, all read from the running interpreter, so nothing is ever downloaded:

* ``stdlib-code``: each stdlib ``.py`` file as one document (tests, idlelib, turtledemo and
  site-packages are skipped);
* ``stdlib-docs``: English prose, the module/class/function docstrings of each file (via ``ast``),
  joined in source order into one document per file;
* ``pydoc-topics``: the language-reference topics that ``help()`` shows (``pydoc_data.topics``).

Train and validation are split by *file* (a hash of the path relative to the stdlib root), so the
code and docstrings of one module always land on the same side and validation text is never seen in
training. Topics are split by topic name. Iteration is in sorted order, so the corpus is the same on
every machine with the same Python version (the stdlib itself differs between versions).
"""

from __future__ import annotations

import ast
import hashlib
import os
import sysconfig
import tokenize
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Split = Literal["train", "val"]

VAL_FRACTION = 0.03
# Path components that mark test suites, the IDE, demos and third-party code.
_SKIP_DIRS = frozenset(
    {"test", "tests", "idlelib", "turtledemo", "site-packages", "dist-packages", "__pycache__"}
)
# Files whose text is already in another source (the topics are yielded as prose).
_SKIP_FILES = frozenset({"pydoc_data/topics.py"})


@dataclass(frozen=True)
class Document:
    text: str
    source: str  # "stdlib-code" | "stdlib-docs" | "pydoc-topics"
    id: str  # "<source>:<relative path or topic name>", unique within the corpus


def split_of(key: str, val_fraction: float = VAL_FRACTION) -> Split:
    """Deterministic train/val assignment of a file path or topic name (machine independent)."""
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")
    return "val" if h % 1_000_000 < val_fraction * 1_000_000 else "train"


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[str]:
    """Relative POSIX paths of the stdlib's own ``.py`` files, sorted."""
    root = root or stdlib_root()
    out: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
        rel_dir = Path(dirpath).relative_to(root)
        for name in filenames:
            if name.endswith(".py"):
                rel = (rel_dir / name).as_posix()
                if rel not in _SKIP_FILES:
                    out.append(rel)
    return sorted(out)


def _read_source(path: Path) -> str | None:
    try:
        with tokenize.open(path) as f:  # honours PEP 263 coding cookies
            return f.read()
    except (OSError, SyntaxError, UnicodeDecodeError):
        return None


def extract_docstrings(source: str) -> list[str]:
    """Module, class and function docstrings of `source`, cleaned, in source order."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid escapes in old files are not our concern
            tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, kinds):
            doc = ast.get_docstring(node, clean=True)
            if doc and doc.strip():
                found.append((getattr(node, "lineno", 0), doc.strip()))
    found.sort(key=lambda x: x[0])  # ast.walk is breadth-first; prose reads better in file order
    return [d for _, d in found]


def _pydoc_topics() -> dict[str, str]:
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip pydoc_data
        return {}
    return dict(topics)


def _iter_all(split: Split) -> Iterator[Document]:
    # Topics first: a small cap then still yields some prose, not only code.
    topics = _pydoc_topics()
    for name in sorted(topics):
        text = topics[name].strip()
        if text and split_of(f"pydoc-topics/{name}") == split:
            yield Document(text + "\n", "pydoc-topics", f"pydoc-topics:{name}")
    root = stdlib_root()
    for rel in stdlib_files(root):
        if split_of(rel) != split:
            continue
        source = _read_source(root / rel)
        if not source or not source.strip():
            continue
        yield Document(source, "stdlib-code", f"stdlib-code:{rel}")
        docs = extract_docstrings(source)
        if docs:
            yield Document("\n\n".join(docs) + "\n", "stdlib-docs", f"stdlib-docs:{rel}")


def iter_stdlib_documents(
    split: Split = "train", max_bytes: int | None = None
) -> Iterator[Document]:
    """Yield the `split` documents in a fixed order until `max_bytes` of UTF-8 text are reached.

    Documents are never cut: the one that crosses `max_bytes` is the last one yielded.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    total = 0
    for doc in _iter_all(split):
        if max_bytes is not None and total >= max_bytes:
            return
        total += len(doc.text.encode())
        yield doc
