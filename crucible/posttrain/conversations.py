"""Conversations: the data model, validation, and readers for JSONL and local HF datasets.

A record is the `messages` format used by TRL and the OpenAI API::

    {"messages": [{"role": "system" | "user" | "assistant" | "tool", "content": "...",
                   "reasoning_content": "...",                       # assistant, optional
                   "tool_calls": [{"id": "c1", "type": "function",   # assistant, optional
                                   "function": {"name": "f", "arguments": "{\\"x\\": 1}"}}],
                   "tool_call_id": "c1"}],                           # tool, optional
     "tools": [...],                   # optional JSON schemas of the callable functions
     "chat_template_kwargs": {...},    # optional: enable_thinking, xml_tools, python_tools, ...
     "id": "...", "meta": {...}}       # optional: a name for the record, free-form metadata

Reasoning may also be given as ``reasoning`` or ``thinking``, or inline as a leading
``<think>...</think>`` in an assistant's content. Tool-call arguments may be a JSON string (OpenAI)
or an object. A broken record is never fatal: it is named (``file:line`` or ``path[split]:row``),
counted under a short reason, and left out; every other record is used.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crucible.config import ConfigError

ROLES = ("system", "user", "assistant", "tool")
REASONING_FIELDS = ("reasoning_content", "reasoning", "thinking")
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]
    id: str | None = None

    def to_template(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }
        if self.id is not None:
            d["id"] = self.id
        return d

    def to_record(self) -> dict[str, Any]:
        """OpenAI shape: arguments as a JSON string."""
        d = self.to_template()
        d["function"] = {
            "name": self.name,
            "arguments": json.dumps(self.arguments, ensure_ascii=False),
        }
        return d


@dataclass(frozen=True)
class Message:
    role: str
    content: str = ""
    reasoning: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None

    def to_template(self, record: bool = False) -> dict[str, Any]:
        """The dict a chat template sees (record=True: the JSONL form, arguments as strings)."""
        d: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.reasoning is not None:
            d["reasoning_content"] = self.reasoning
        if self.tool_calls:
            d["tool_calls"] = [
                c.to_record() if record else c.to_template() for c in self.tool_calls
            ]
        if self.tool_call_id is not None:
            d["tool_call_id"] = self.tool_call_id
        return d


@dataclass(frozen=True)
class Conversation:
    messages: tuple[Message, ...]
    tools: tuple[dict[str, Any], ...] | None = None
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    name: str = "<conversation>"  # where it came from, for messages: "file.jsonl:12"
    meta: dict[str, Any] = field(default_factory=dict)

    def template_messages(self) -> list[dict[str, Any]]:
        return [m.to_template() for m in self.messages]

    def to_record(self) -> dict[str, Any]:
        """A JSONL record in the `messages` format (reads back to an equal Conversation)."""
        d: dict[str, Any] = {"messages": [m.to_template(record=True) for m in self.messages]}
        if self.tools is not None:
            d["tools"] = list(self.tools)
        if self.template_kwargs:
            d["chat_template_kwargs"] = dict(self.template_kwargs)
        if self.meta:
            d["meta"] = dict(self.meta)
        return d

    @property
    def last_assistant(self) -> int:
        """Index of the last assistant message (-1 if none)."""
        roles = [m.role for m in self.messages]
        return len(roles) - 1 - roles[::-1].index("assistant") if "assistant" in roles else -1


# --------------------------------------------------------------------------- validation


class RecordError(ValueError):
    """A record that cannot be used; `kind` is a short reason used for counting."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind, self.detail = kind, detail


@dataclass(frozen=True)
class Issue:
    record: str  # "file.jsonl:12"
    kind: str  # "missing role", "empty content", ...
    detail: str

    def __str__(self) -> str:
        return f"{self.record}: {self.detail}"


def _text(value: Any, where: str) -> str:
    """Content as a string: a string, or OpenAI content parts of type text (joined)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        parts = []
        for p in value:
            if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str):
                parts.append(p["text"])
            else:
                kind = p.get("type") if isinstance(p, dict) else type(p).__name__
                raise RecordError(
                    "unsupported content",
                    f"{where} has a content part of type {kind!r} (text only)",
                )
        return "".join(parts)
    raise RecordError(
        "bad content", f"{where} content is {type(value).__name__}, expected a string"
    )


def _tool_call(raw: Any, where: str) -> ToolCall:
    if not isinstance(raw, dict):
        raise RecordError("bad tool call", f"{where} is not an object")
    fn = raw.get("function") if isinstance(raw.get("function"), dict) else raw
    name = fn.get("name")
    if not isinstance(name, str) or not name:
        raise RecordError("bad tool call", f"{where} has no function name")
    args = fn.get("arguments", {})
    if args is None:
        args = {}
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as e:
            raise RecordError(
                "bad tool call", f"{where} arguments are not valid JSON ({e.msg})"
            ) from None
    if not isinstance(args, dict):
        raise RecordError("bad tool call", f"{where} arguments are not a JSON object")
    call_id = raw.get("id")
    return ToolCall(name, args, str(call_id) if call_id is not None else None)


def _split_inline_reasoning(content: str) -> tuple[str | None, str]:
    stripped = content.lstrip()
    if stripped.startswith(THINK_OPEN) and THINK_CLOSE in stripped:
        inner, _, rest = stripped[len(THINK_OPEN) :].partition(THINK_CLOSE)
        return inner.strip("\n"), rest.lstrip("\n")
    return None, content


def _message(raw: Any, i: int) -> Message:
    where = f"message {i}"
    if not isinstance(raw, dict):
        raise RecordError("bad message", f"{where} is not an object")
    role = raw.get("role")
    if role is None:
        raise RecordError("missing role", f"{where} has no role")
    if role not in ROLES:
        raise RecordError(
            "unknown role", f"{where} has unknown role {role!r} (allowed: {', '.join(ROLES)})"
        )
    content = raw.get("content")
    content = "" if content is None else _text(content, where)
    reasoning = next((raw[k] for k in REASONING_FIELDS if raw.get(k) is not None), None)
    if reasoning is not None and not isinstance(reasoning, str):
        raise RecordError("bad content", f"{where} reasoning is not a string")
    calls_raw = raw.get("tool_calls") or []
    if not isinstance(calls_raw, list):
        raise RecordError("bad tool call", f"{where} tool_calls is not a list")
    calls = tuple(_tool_call(c, f"{where} tool call {j}") for j, c in enumerate(calls_raw))
    if role != "assistant" and (calls or reasoning is not None):
        what = "tool calls" if calls else "reasoning"
        raise RecordError("misplaced field", f"{where} ({role}) has {what}; only assistants do")
    if role == "assistant" and reasoning is None:
        reasoning, content = _split_inline_reasoning(content)
    if not content.strip() and not (role == "assistant" and (calls or reasoning)):
        raise RecordError("empty content", f"{where} ({role}) has empty content")
    call_id = raw.get("tool_call_id")
    return Message(role, content, reasoning, calls, str(call_id) if call_id is not None else None)


def _check_structure(messages: list[Message]) -> None:
    if not messages:
        raise RecordError("no messages", "the conversation has no messages")
    for i, m in enumerate(messages):
        if m.role == "system" and i != 0:
            raise RecordError("misplaced system", f"message {i}: only the first may be system")
    if not any(m.role == "assistant" for m in messages):
        raise RecordError("no assistant turn", "no assistant message (nothing to learn from)")
    i = 0
    while i < len(messages):
        a, m = i, messages[i]
        if m.role == "tool":
            raise RecordError(
                "tool result without call", f"message {i}: tool result without a call"
            )
        i += 1
        if m.role != "assistant" or not m.tool_calls:
            continue
        # The calls must be answered by tool messages right after, by id where ids are given.
        pending = [c.id for c in m.tool_calls]
        while i < len(messages) and messages[i].role == "tool":
            rid = messages[i].tool_call_id
            if rid is not None and None not in pending:
                if rid not in pending:
                    raise RecordError(
                        "tool result without call",
                        f"message {i}: tool result for unknown call id {rid!r}",
                    )
                pending.remove(rid)
            elif pending:
                pending.pop(0)
            else:
                raise RecordError(
                    "tool result without call", f"message {i}: more results than calls"
                )
            i += 1
        if pending:
            raise RecordError(
                "tool call without result",
                f"message {a}: {len(pending)} of {len(m.tool_calls)} tool call(s) without a "
                "tool result",
            )


def parse_record(raw: Any, name: str = "<record>") -> Conversation:
    """A validated Conversation from one record; RecordError says why not."""
    if not isinstance(raw, dict):
        raise RecordError("not an object", f"record is {type(raw).__name__}, not an object")
    msgs = raw.get("messages")
    if msgs is None:
        raise RecordError("no messages", "record has no 'messages' list")
    if not isinstance(msgs, list):
        raise RecordError("no messages", "'messages' is not a list")
    messages = [_message(m, i) for i, m in enumerate(msgs)]
    _check_structure(messages)
    tools = raw.get("tools")
    if isinstance(tools, str):  # some datasets store the schemas as a JSON string
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError:
            raise RecordError("bad tools", "'tools' is a string but not JSON") from None
    if tools is not None and not (
        isinstance(tools, list) and all(isinstance(t, dict) for t in tools)
    ):
        raise RecordError("bad tools", "'tools' must be a list of JSON schema objects")
    kwargs = raw.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise RecordError("bad chat_template_kwargs", "'chat_template_kwargs' is not an object")
    # Arrow-backed datasets fill absent struct fields with None: None means "not given".
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    meta = raw.get("meta") if isinstance(raw.get("meta"), dict) else {}
    rid = raw.get("id")
    return Conversation(
        tuple(messages),
        tuple(tools) if tools else None,
        kwargs,
        name if rid is None else f"{name} ({rid})",
        meta,
    )


# --------------------------------------------------------------------------- reading


@dataclass
class ReadResult:
    source: str
    conversations: list[Conversation] = field(default_factory=list)
    issues: list[Issue] = field(default_factory=list)

    @property
    def total(self) -> int:
        return len(self.conversations) + len(self.issues)

    def counts(self) -> Counter[str]:
        return Counter(i.kind for i in self.issues)

    def summary(self, show: int = 5) -> str:
        """One line per fact: records used, broken ones by reason, the first few named."""
        lines = [f"{self.source}: {len(self.conversations)} of {self.total} records used"]
        if self.issues:
            by_kind = ", ".join(f"{k} ({n})" for k, n in self.counts().most_common())
            lines.append(f"  {len(self.issues)} broken, left out: {by_kind}")
            lines += [f"    {i}" for i in self.issues[:show]]
            if len(self.issues) > show:
                lines.append(f"    ... and {len(self.issues) - show} more")
        return "\n".join(lines)

    def add(self, raw: Any, name: str) -> None:
        try:
            self.conversations.append(parse_record(raw, name))
        except RecordError as e:
            self.issues.append(Issue(name, e.kind, e.detail))


def parse_records(records: Iterable[Any], source: str = "<records>") -> ReadResult:
    """Validate in-memory records; names are ``source:N`` (N from 1)."""
    out = ReadResult(source)
    for n, raw in enumerate(records, start=1):
        out.add(raw, f"{source}:{n}")
    return out


def read_jsonl(path: str | os.PathLike[str]) -> ReadResult:
    """Read a `messages`-format JSONL file; broken lines are named ``file:line`` and counted."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"conversations file not found: {p}")
    out = ReadResult(str(p))
    with p.open(encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            name = f"{p.name}:{lineno}"
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as e:
                out.issues.append(Issue(name, "invalid JSON", f"invalid JSON ({e.msg})"))
                continue
            out.add(raw, name)
    return out


def _hf_rows(path: Path, split: str) -> tuple[Iterator[dict[str, Any]], str]:
    try:
        import datasets
    except ImportError:
        raise ConfigError(
            f"{path}: reading HF datasets needs the `datasets` package (pip install datasets)"
        ) from None
    if path.is_dir():
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ConfigError(
                    f"{path}: no split {split!r} (available: {', '.join(sorted(ds))})"
                )
            ds = ds[split]
        return iter(ds), f"{path.name}[{split}]"
    kinds = {".parquet": "parquet", ".arrow": "arrow", ".jsonl": "json", ".json": "json"}
    kind = kinds.get(path.suffix)
    if kind is None:
        raise ConfigError(f"{path}: unknown dataset file type (use {', '.join(kinds)})")
    ds = datasets.load_dataset(kind, data_files=str(path), split="train")
    return iter(ds), path.name


def read_hf_dataset(path: str | os.PathLike[str], split: str = "train") -> ReadResult:
    """Read a local HF dataset: a `save_to_disk` directory, or a Parquet / Arrow / JSON file.

    Rows are named ``name[split]:row`` (rows from 0). Nothing is downloaded.
    """
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"dataset not found: {p}")
    rows, label = _hf_rows(p, split)
    out = ReadResult(str(p))
    for i, raw in enumerate(rows):
        out.add(raw, f"{label}:{i}")
    return out


def read_conversations(path: str | os.PathLike[str], split: str = "train") -> ReadResult:
    """JSONL files with the JSONL reader (line numbers), everything else through `datasets`."""
    p = Path(path)
    if p.is_file() and p.suffix == ".jsonl":
        return read_jsonl(p)
    return read_hf_dataset(p, split)


def write_jsonl(conversations: Iterable[Conversation], path: str | os.PathLike[str]) -> int:
    """Write records atomically (temp file, then rename); returns how many."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    n = 0
    try:
        with tmp.open("w", encoding="utf-8") as f:
            for c in conversations:
                f.write(json.dumps(c.to_record(), ensure_ascii=False) + "\n")
                n += 1
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return n
