"""Offline chat data: a deterministic, documented-synthetic generator with held-out splits.

Every conversation is made up here from the embedded corpus (the Python standard library) and
from verifiable arithmetic, so SFT runs with no download. Nothing in it is real user data; each
record says so in ``meta`` (``synthetic: true``, the task, the expected answer, the mode).

Tasks:
  docstring_qa       "What does `json.dumps` do?" -> the first paragraph of its docstring
  name_the_function  "Which function in `json` does: <summary>?" -> ``dumps``
  arithmetic         word problems; think mode has a worked reasoning trace, no-think mode the
                     direct answer; answers end with "The answer is N."
  tool_call          larger numbers: the assistant calls a ``calculator`` tool (XML tool calls
                     or Python code tools) and uses its result
  multi_turn         2-3 turns of the above under a system prompt (persona, /think, /no_think,
                     /system_override)

Held-out splits: ``test`` uses only functions of held-out stdlib files (the corpus's own file
split, so the pretraining corpus never saw them either) and arithmetic expressions whose hash
falls in the test bucket; ``train`` uses the rest, minus the expressions of the built-in
``arithmetic`` evaluation. The same (split, n, seed) always gives the same records.
"""

from __future__ import annotations

import ast
import datetime as dt
import operator
import random
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any, Literal

from crucible.data.corpora import split_of, stdlib_files, stdlib_root
from crucible.evaluate.builtin import BUILTIN_SIZE, arithmetic_pairs
from crucible.posttrain.conversations import Conversation, Message, ToolCall

Split = Literal["train", "test"]
TASKS: dict[str, float] = {  # default mixture (fractions of the records)
    "docstring_qa": 0.2,
    "name_the_function": 0.15,
    "arithmetic": 0.3,
    "tool_call": 0.2,
    "multi_turn": 0.15,
}
TEST_FRACTION = 0.2  # of arithmetic expressions; functions follow the corpus's file split

CALCULATOR: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Evaluate integer arithmetic: + - * and parentheses.",
        "parameters": {
            "type": "object",
            "properties": {"expression": {"type": "string"}},
            "required": ["expression"],
        },
    },
}

_NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jo", "Kofi", "Lea"]
_ITEMS = ["apples", "marbles", "books", "stickers", "coins", "pencils", "shells", "cards"]
_PERSONAS = [
    "You are a concise Python tutor.",
    "Answer in as few words as you can.",
    "You are a friendly assistant who helps with Python and arithmetic.",
    "You are PyHelper, an assistant that knows the Python standard library well.",
]


# --------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class Function:
    module: str
    name: str
    signature: str  # "(obj, *, indent=None)"
    summary: str  # the first paragraph of the docstring, on one line

    @property
    def qualname(self) -> str:
        return f"{self.module}.{self.name}"


def _module_name(rel: str) -> str:
    parts = rel.removesuffix(".py").split("/")
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _summary(doc: str, name: str) -> str | None:
    para = " ".join(doc.strip().split("\n\n")[0].split())
    if not 20 <= len(para) <= 240 or ">>>" in para or "<|" in para or name in para:
        return None  # too short or long, an example, or it gives the answer away
    return para


_TOP_DEF = re.compile(r"^def [A-Za-z]\w*\s*\(", re.MULTILINE)


def _top_level_functions(source: str) -> list[ast.FunctionDef]:
    """The module-level `def`s of a source file, each parsed alone (parsing whole files is
    several times slower, and classes, the bulk of the code, are not needed)."""
    lines = source.split("\n")  # not splitlines(): form feeds must not start lines
    starts = sorted({source.count("\n", 0, m.start()) for m in _TOP_DEF.finditer(source)})
    out = []
    for k, start in enumerate(starts):
        end = start + 1
        while end < len(lines) and (not lines[end][:1].strip() or lines[end][0] in "#)"):
            end += 1  # blank, indented, comment or closing-parenthesis lines continue the def
        # Fallback: up to the next def (a docstring may have unindented lines).
        nxt = starts[k + 1] if k + 1 < len(starts) else len(lines)
        for stop in dict.fromkeys((end, nxt)):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    tree = ast.parse("\n".join(lines[start:stop]))
            except (SyntaxError, ValueError):
                continue
            out.append(tree.body[0])
            break
    return [n for n in out if isinstance(n, ast.FunctionDef)]


@cache
def stdlib_functions(split: Split) -> tuple[Function, ...]:
    """Public module-level functions with a docstring, from the stdlib files of `split`.

    test = the corpus's held-out ("val") files. One function per (module, summary), so a
    summary always names exactly one function of its module.
    """
    root = stdlib_root()
    out: dict[tuple[str, str], Function] = {}
    for rel in stdlib_files(root):
        if (split_of(rel) == "val") != (split == "test"):
            continue
        module = _module_name(rel)
        if any(p.startswith("_") for p in module.split(".")):
            continue
        try:
            source = (root / rel).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        for node in _top_level_functions(source):
            if node.name.startswith("_"):
                continue
            summary = _summary(ast.get_docstring(node) or "", node.name)
            if summary is None:
                continue
            args = ast.unparse(node.args)
            out.setdefault((module, summary), Function(module, node.name, f"({args})", summary))
    return tuple(sorted(out.values(), key=lambda f: (f.module, f.name)))


_OPS: dict[type, Callable[[int, int], int]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
}


def evaluate_expression(expression: str) -> str:
    """The calculator tool: integer + - * and parentheses, evaluated without `eval`."""

    def ev(node: ast.AST) -> int:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -ev(node.operand)
        raise ValueError(f"unsupported expression: {expression!r}")

    try:
        tree = ast.parse(expression, mode="eval")
    except SyntaxError:
        return f"error: cannot parse {expression!r}"
    try:
        return str(ev(tree.body))
    except ValueError as e:
        return f"error: {e}"


def _split_of_expression(expr: str) -> Split:
    return "test" if split_of(f"chat-arith:{expr}", TEST_FRACTION) == "val" else "train"


@cache
def _builtin_eval_expressions() -> frozenset[str]:
    return frozenset(e for e, _ in arithmetic_pairs(BUILTIN_SIZE, 0))


def _arith_problems(split: Split, seed: int) -> list[tuple[int, str, int]]:
    """(a, op, b) of `split`, drawn with the built-in task's generator, a >= b for '-'."""
    seen, out = set(), []
    for expr, _ in arithmetic_pairs(20_000, seed=10_000 + seed):
        a_s, op, b_s = expr.split()
        a, b = int(a_s), int(b_s)
        if op == "-" and a < b:
            a, b = b, a
        key = f"{a} {op} {b}"
        if key in seen or _split_of_expression(key) != split:
            continue
        if split == "train" and key in _builtin_eval_expressions():
            continue
        seen.add(key)
        out.append((a, op, b))
    return out


# --------------------------------------------------------------------------- tasks


@dataclass
class _Turn:
    user: str
    answer: str  # the assistant's reply
    reasoning: str  # used in think mode
    key: str  # what makes the item held out (function or expression)
    expected: str  # the verifiable answer
    tool: tuple[str, str] | None = None  # (expression, result) of a calculator call


def _docstring_qa(rng: random.Random, fn: Function) -> _Turn:
    q = rng.choice(
        [
            "What does `{q}` do?",
            "Explain the standard-library function `{q}`.",
            "In Python, what is `{q}` for?",
        ]
    ).format(q=fn.qualname)
    reasoning = (
        f"`{fn.name}` is a function of the `{fn.module}` module, called as "
        f"`{fn.qualname}{fn.signature}`. Its documentation says: {fn.summary}"
    )
    return _Turn(q, f"`{fn.qualname}{fn.signature}`: {fn.summary}", reasoning, fn.qualname,
                 fn.summary)  # fmt: skip


def _name_the_function(rng: random.Random, fn: Function) -> _Turn:
    q = rng.choice(
        [
            'Which function of the `{m}` module does this: "{s}"? Answer with its name only.',
            'Name the function in `{m}` described as: "{s}"',
        ]
    ).format(m=fn.module, s=fn.summary)
    reasoning = (
        f"I need the function of `{fn.module}` whose documentation reads: {fn.summary} "
        f"That is `{fn.name}`."
    )
    return _Turn(q, fn.name, reasoning, fn.qualname, fn.name)


def _worked(a: int, op: str, b: int) -> str:
    """A short column-style computation of a op b (direct when there is nothing to split)."""
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    if op == "+" and a < b:
        a, b = b, a
    if max(a, b) < 10 or (op != "*" and b < 10):
        return f"{a} {op} {b} = {value}."
    if op == "+":
        tens, ones = a // 10 * 10 + b // 10 * 10, a % 10 + b % 10
        return f"{a // 10 * 10} + {b // 10 * 10} = {tens}, {a % 10} + {b % 10} = {ones}, " \
               f"and {tens} + {ones} = {a + b}."  # fmt: skip
    if op == "-":
        step = a - b // 10 * 10
        return f"{a} - {b // 10 * 10} = {step}, then {step} - {b % 10} = {a - b}."
    big, small = (a, b) if b < 13 else (b, a)
    hi, lo = big // 10 * 10 * small, big % 10 * small
    return f"{big // 10 * 10} * {small} = {hi}, {big % 10} * {small} = {lo}, " \
           f"and {hi} + {lo} = {a * b}."  # fmt: skip


def _arithmetic(rng: random.Random, a: int, op: str, b: int) -> _Turn:
    name, items = rng.choice(_NAMES), rng.choice(_ITEMS)
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    if op == "+":
        q = f"{name} has {a} {items} and gets {b} more. How many {items} does {name} have now?"
        setup = f"{name} starts with {a} {items} and gets {b} more, so I add {a} + {b}."
    elif op == "-":
        q = f"{name} has {a} {items} and gives {b} away. How many {items} are left?"
        setup = f"{name} starts with {a} {items} and gives away {b}, so I subtract {a} - {b}."
    else:
        q = f"{name} buys {a} bags with {b} {items} in each. How many {items} is that in total?"
        setup = f"There are {a} bags of {b} {items}, so I multiply {a} * {b}."
    return _Turn(q, f"The answer is {value}.", f"{setup} {_worked(a, op, b)}",
                 f"{a} {op} {b}", str(value))  # fmt: skip


def _tool_problem(rng: random.Random, split: Split) -> _Turn:
    while True:
        op = rng.choice("+*")
        if op == "*":
            a, b = rng.randint(101, 999), rng.randint(13, 99)
        else:
            a, b = rng.randint(1000, 9999), rng.randint(1000, 9999)
        expr = f"{a} {op} {b}"
        if _split_of_expression(expr) == split:
            break
    result = evaluate_expression(expr)
    q = rng.choice(["What is {e}?", "Compute {e}.", "Please calculate {e} for me."]).format(e=expr)
    return _Turn(q, f"{expr} = {result}. The answer is {result}.",
                 "These numbers are large, so I use the calculator tool.", expr, result,
                 tool=(expr, result))  # fmt: skip


def _date(rng: random.Random) -> str:
    day = dt.date(2025, 1, 1) + dt.timedelta(days=rng.randrange(730))
    return day.strftime("%d %B %Y")


class _Generator:
    def __init__(self, split: Split, seed: int) -> None:
        self.split, self.seed = split, seed
        self.rng = random.Random(f"chat-data:{split}:{seed}")
        self.functions = list(stdlib_functions(split))
        self.problems = _arith_problems(split, seed)
        if not self.functions or not self.problems:
            raise ValueError(f"no source material for the {split} split")
        self.rng.shuffle(self.functions)
        self._fi = self._pi = 0

    def function(self) -> Function:
        fn = self.functions[self._fi % len(self.functions)]
        self._fi += 1
        return fn

    def problem(self) -> tuple[int, str, int]:
        p = self.problems[self._pi % len(self.problems)]
        self._pi += 1
        return p

    def turn(self, task: str) -> _Turn:
        if task == "docstring_qa":
            return _docstring_qa(self.rng, self.function())
        if task == "name_the_function":
            return _name_the_function(self.rng, self.function())
        if task == "arithmetic":
            return _arithmetic(self.rng, *self.problem())
        return _tool_problem(self.rng, self.split)

    def conversation(self, index: int, task: str) -> Conversation:
        rng = self.rng
        think = rng.random() < 0.5
        kwargs: dict[str, Any] = {"today_date": _date(rng)}
        messages: list[Message] = []
        if task == "multi_turn":
            flag = rng.choice(["flag", "flag", "kwarg", "override"])
            persona = rng.choice(_PERSONAS)
            if flag == "flag":
                messages.append(
                    Message("system", f"{persona} {'/think' if think else '/no_think'}")
                )
            elif flag == "override":
                messages.append(Message("system", f"/system_override {persona}"))
                kwargs["enable_thinking"] = think
            else:
                messages.append(Message("system", persona))
                kwargs["enable_thinking"] = think
            kinds = ["docstring_qa", "name_the_function", "arithmetic"]
            turns = [self.turn(rng.choice(kinds)) for _ in range(rng.randint(2, 3))]
        else:
            kwargs["enable_thinking"] = think
            turns = [self.turn(task)]
        style = None
        for k, t in enumerate(turns):
            messages.append(Message("user", t.user))
            reasoning = t.reasoning if think else None
            if t.tool is None:
                messages.append(Message("assistant", t.answer, reasoning))
                continue
            style = rng.choice(["xml", "xml", "tools", "python"])
            expr, result = t.tool
            call = ToolCall("calculator", {"expression": expr}, f"call_{index}_{k}")
            messages.append(Message("assistant", "", reasoning, (call,)))
            messages.append(Message("tool", result, tool_call_id=call.id))
            done = f"The calculator returned {result}." if think else None
            messages.append(Message("assistant", t.answer, done))
        tools = None
        if style == "tools":
            tools = (CALCULATOR,)
        elif style is not None:
            kwargs["xml_tools" if style == "xml" else "python_tools"] = [CALCULATOR]
        meta = {
            "synthetic": True,
            "task": task,
            "split": self.split,
            "mode": "think" if think else "no_think",
            "answers": [t.expected for t in turns],
            "keys": [t.key for t in turns],
        }
        if style is not None:
            meta["tool_style"] = style
        name = f"synthetic-{self.split}-{self.seed}:{index}"
        return Conversation(tuple(messages), tools, kwargs, name, meta)


def _task_order(n: int, tasks: dict[str, float], rng: random.Random) -> list[str]:
    """Exactly round(n * share) of each task (largest remainders), in a seeded order."""
    total = sum(tasks.values())
    exact = {t: n * w / total for t, w in tasks.items()}
    counts = {t: int(x) for t, x in exact.items()}
    for t in sorted(exact, key=lambda t: counts[t] - exact[t])[: n - sum(counts.values())]:
        counts[t] += 1
    order = [t for t, c in counts.items() for _ in range(c)]
    rng.shuffle(order)
    return order


def generate(
    split: Split, n: int, seed: int = 0, tasks: dict[str, float] | None = None
) -> list[Conversation]:
    """`n` synthetic conversations of `split` ("train" or "test"), deterministic in the inputs."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    tasks = tasks or TASKS
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        raise ValueError(f"unknown task(s) {', '.join(unknown)}; known: {', '.join(TASKS)}")
    if n < 0 or any(w < 0 for w in tasks.values()) or not sum(tasks.values()):
        raise ValueError("n and the task weights must be >= 0, with at least one weight > 0")
    gen = _Generator(split, seed)
    order = _task_order(n, tasks, random.Random(f"chat-order:{split}:{seed}"))
    return [gen.conversation(i, task) for i, task in enumerate(order)]


_ANSWER = re.compile(r"The answer is (-?\d+)\.")


def extract_answer(reply: str) -> str | None:
    """The number of the last "The answer is N." in a reply (how arithmetic tasks are graded)."""
    found = _ANSWER.findall(reply)
    return found[-1] if found else None
