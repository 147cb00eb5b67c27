"""Every number in docs/ has its raw output: cited results files exist, and each table of
docs/benchmarks.md cites one (or says plainly that its raw output was not kept)."""

import re
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs"
CITE = re.compile(r"(?:docs/)?results/[\w.\-/]+")


def _citations(text: str) -> list[str]:
    return [m.group(0).removeprefix("docs/").rstrip(".)/") for m in CITE.finditer(text)]


def test_every_cited_results_file_exists():
    cited = {}
    for doc in DOCS.rglob("*.md"):
        for ref in _citations(doc.read_text(encoding="utf-8")):
            cited.setdefault(ref, doc.name)
    assert cited, "no doc cites docs/results/"
    missing = {ref: doc for ref, doc in cited.items() if not (DOCS / ref).exists()}
    assert not missing, f"cited results that do not exist: {missing}"


def test_every_benchmark_table_cites_its_raw_output():
    text = (DOCS / "benchmarks.md").read_text(encoding="utf-8")
    sections = re.split(r"\n(?=## )", text)
    for section in sections:
        if "\n|---" not in section:
            continue
        title = section.splitlines()[0]
        assert "`" in section, f"{title}: names no command"
        assert _citations(section) or "No raw output was kept" in section, (
            f"{title}: a table without raw output under docs/results/"
        )
