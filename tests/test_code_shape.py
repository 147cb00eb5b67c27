"""The quickstart's Python-shape checks on hand-written samples."""

from crucible.evaluate.code_shape import PythonShape, cut_function, shape_summary

GOOD = "def area(w, h):\n    if w < 0:\n        raise ValueError(w)\n    return w * h"


def test_cut_function_stops_at_the_next_top_level_line():
    text = GOOD + "\n\n\nclass Box:\n    pass\n"
    assert cut_function(text) == GOOD
    # Blank and indented lines belong to the body; a comment at column 0 ends it.
    assert cut_function("def f():\n\n    x = 1\n# done\ny = 2") == "def f():\n\n    x = 1"
    assert cut_function("def f(") == "def f("  # nothing to cut
    # No top-level line: the budget ran out inside the body, so its unfinished last line goes.
    assert cut_function("def f(x):\n    y = 1\n    return g(x,") == "def f(x):\n    y = 1"


def test_shape_of_a_real_function_and_of_broken_ones():
    assert PythonShape.of(GOOD) == PythonShape(True, True, True, True, True)
    flat = PythonShape.of("def f(x):\nreturn x")
    assert (
        flat.signature
        and not flat.indented
        and flat.has_return
        and flat.balanced
        and not flat.parses
    )
    unclosed = PythonShape.of("def f(x):\n    return g(x[0)")
    assert unclosed.indented and not unclosed.balanced and not unclosed.parses
    # `return` must be a word: "returned" does not count.
    assert not PythonShape.of("def f():\n    returned = 1").has_return
    # Closing before opening is unbalanced even when the counts agree.
    assert not PythonShape.of("def f):\n    (").balanced
    # The signature needs a name and an opening parenthesis: "def = 1" is an assignment.
    assert not PythonShape.of("def = 1").signature and not PythonShape.of("def 's'(").signature


def test_summary_counts_each_check():
    shapes = [PythonShape.of(GOOD), PythonShape.of("def f(x):\nreturn x")]
    assert shape_summary(shapes) == (
        "signature 2/2, indented 1/2, return 2/2, balanced brackets 2/2, parses 1/2"
    )
