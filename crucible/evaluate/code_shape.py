"""Does a sampled continuation of `def ` look like Python? Cheap shape checks on the text.

The quickstart's model is far too small to write correct code; what it can learn in a few
minutes is the shape: an indented body, a `return`, parentheses that close. These checks
count that shape so a user sees it as numbers, not by eye.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass

# A line starting at column 0 after the `def` line ends the function (HumanEval's stop strings
# "\ndef", "\nclass", "\nif", "\nprint", ... are special cases of this).
_TOP_LEVEL = re.compile(r"\n(?=\S)")
_RETURN = re.compile(r"\breturn\b")
_SIGNATURE = re.compile(r"def [A-Za-z_]\w*\(")
_PAIRS = {")": "(", "]": "[", "}": "{"}


def cut_function(text: str) -> str:
    """The first top-level statement of `text` (a function: its `def` line and its body).

    When no top-level line follows (the token budget ran out inside the body), the last line is
    dropped: it was cut mid-way by the budget, not ended by the model.
    """
    m = _TOP_LEVEL.search(text)
    if m:
        return text[: m.start()].rstrip()
    head, newline, _ = text.rpartition("\n")
    return (head if newline else text).rstrip()


def brackets_balanced(text: str) -> bool:
    """Every (, [ and { closes in order, and nothing closes that was not opened."""
    stack: list[str] = []
    for ch in text:
        if ch in "([{":
            stack.append(ch)
        elif ch in _PAIRS and (not stack or stack.pop() != _PAIRS[ch]):
            return False
    return not stack


def parses(text: str) -> bool:
    try:
        ast.parse(text)
    except (SyntaxError, ValueError):
        return False
    return True


@dataclass(frozen=True)
class PythonShape:
    signature: bool  # it opens as `def name(`
    indented: bool  # a body line starts with whitespace
    has_return: bool
    balanced: bool  # (), [] and {} all close, in order
    parses: bool  # the whole function is valid Python (`ast.parse`)

    @classmethod
    def of(cls, function: str) -> PythonShape:
        body = function.split("\n")[1:]
        return cls(
            signature=bool(_SIGNATURE.match(function)),
            indented=any(line[:1] in (" ", "\t") and line.strip() for line in body),
            has_return=bool(_RETURN.search(function)),
            balanced=brackets_balanced(function),
            parses=parses(function),
        )


def shape_summary(shapes: list[PythonShape]) -> str:
    """'signature 3/3, indented 3/3, return 2/3, balanced brackets 3/3, parses 1/3'."""
    n = len(shapes)

    def count(field: str) -> str:
        return f"{sum(getattr(s, field) for s in shapes)}/{n}"

    return (
        f"signature {count('signature')}, indented {count('indented')}, return {count('has_return')}, "
        f"balanced brackets {count('balanced')}, parses {count('parses')}"
    )
