"""Argument types for the command line: numbers with their allowed range.

argparse reports a value outside the range as `argument --flag: must be ... (got X)`, on one
line, before the command does any work. Used by every `commands.py`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def _number(kind: type, test: Callable[[float], bool], allowed: str) -> Callable[[str], float]:
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{allowed} (got {text!r})") from None
        if isinstance(value, float) and not math.isfinite(value) or not test(value):
            raise argparse.ArgumentTypeError(f"{allowed} (got {text})")
        return value

    parse.__name__ = allowed  # argparse names the type in some messages
    return parse


positive_int = _number(int, lambda v: v >= 1, "must be an integer >= 1")
nonneg_int = _number(int, lambda v: v >= 0, "must be an integer >= 0")
positive_float = _number(float, lambda v: v > 0, "must be a number > 0")
nonneg_float = _number(float, lambda v: v >= 0, "must be a number >= 0")
fraction = _number(float, lambda v: 0 < v <= 1, "must be in (0, 1]")
open_fraction = _number(float, lambda v: 0 < v < 1, "must be in (0, 1)")
port = _number(int, lambda v: 0 <= v <= 65535, "must be a port number in 0..65535")


def check_out_path(path: str | os.PathLike[str], flag: str) -> None:
    """Fail before any work when `path` (a file or folder to create) cannot be written: its
    nearest existing ancestor must be a writable folder. Raises ValueError naming the flag."""
    probe = Path(path).absolute()
    if probe.exists() and not probe.is_dir() and probe.suffix == "":
        raise ValueError(f"{flag} {path}: exists and is not a directory")
    probe = probe.parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: not writable (checked {probe})")


@contextlib.contextmanager
def removed_on_failure(path: str | os.PathLike[str]) -> Iterator[None]:
    """Remove `path` if the block fails and the path did not exist before it: a command may
    delete what it created itself, never anything that was there already."""
    p = Path(path)
    existed = p.exists()
    try:
        yield
    except BaseException:
        if not existed and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        elif not existed and p.exists():
            p.unlink()
        raise


JSON_HELP = "also write the results as JSON to PATH (`-`: standard output)"


def write_json_arg(path: str | os.PathLike[str], payload: Any) -> None:
    """What `--json PATH` means in every command: the results as JSON at PATH, written to a
    temporary name and renamed; `-` prints them to standard output instead."""
    text = json.dumps(payload, indent=1, default=str) + "\n"
    if str(path) == "-":
        sys.stdout.write(text)
        return
    out = Path(path)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, out)
