"""Atomic text writes: write a temporary file beside the target, then rename it over the target,
so a reader (or a crash) never sees half a file and an earlier version survives a failed write."""

from __future__ import annotations

import os
from pathlib import Path


def write_text_atomic(path: Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
