from crucible.data.corpora import (
    Document,
    extract_docstrings,
    iter_stdlib_documents,
    split_of,
    stdlib_files,
    stdlib_root,
)

SMALL = 700_000  # topics (~0.45 MB) first, then some code and docstrings


def _key(doc: Document) -> str:
    source, name = doc.id.split(":", 1)
    return f"pydoc-topics/{name}" if source == "pydoc-topics" else name


def test_sources_are_labelled_and_ids_unique():
    docs = list(iter_stdlib_documents("train", SMALL))
    assert {d.source for d in docs} == {"pydoc-topics", "stdlib-code", "stdlib-docs"}
    assert all(d.id.startswith(d.source + ":") for d in docs)
    assert len({d.id for d in docs}) == len(docs)
    assert all(d.text.strip() for d in docs)
    code = next(d for d in docs if d.source == "stdlib-code")
    path = stdlib_root() / code.id.split(":", 1)[1]
    assert code.text == path.read_text(encoding="utf-8")


def test_deterministic_and_capped():
    a = list(iter_stdlib_documents("train", SMALL))
    b = list(iter_stdlib_documents("train", SMALL))
    assert a == b
    sizes = [len(d.text.encode()) for d in a]
    assert sum(sizes[:-1]) < SMALL <= sum(sizes)  # stops at the cap, never cuts a document


def test_split_is_by_file_and_disjoint():
    val = list(iter_stdlib_documents("val"))
    train = list(iter_stdlib_documents("train", SMALL))
    assert val and all(split_of(_key(d)) == "val" for d in val)
    assert all(split_of(_key(d)) == "train" for d in train)
    assert not {_key(d) for d in val} & {_key(d) for d in train}
    # code and docstrings of one file stay on the same side
    code_files = {_key(d) for d in val if d.source == "stdlib-code"}
    assert {_key(d) for d in val if d.source == "stdlib-docs"} <= code_files
    # roughly the intended share of files goes to validation
    files = stdlib_files()
    share = sum(split_of(f) == "val" for f in files) / len(files)
    assert 0.01 < share < 0.08


def test_files_sorted_without_tests():
    files = stdlib_files()
    assert files == sorted(files) and "os.py" in files
    banned = {"test", "tests", "idlelib", "turtledemo", "site-packages"}
    assert not any(banned & set(f.split("/")) for f in files)


def test_extract_docstrings_in_source_order():
    src = '"""Module."""\n\ndef f():\n    """F doc."""\n\nclass C:\n    """C doc.\n\n    More."""\n'
    assert extract_docstrings(src) == ["Module.", "F doc.", "C doc.\n\nMore."]
    assert extract_docstrings("def broken(:\n") == []
