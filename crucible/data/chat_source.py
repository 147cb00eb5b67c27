"""Conversations as pretraining documents: the `chat:PATH` mixture source (mid-training).

Mid-training continues pretraining on reasoning-style conversations mixed with ordinary text,
with the loss on every token (SmolLM3 mid-trained on reasoning traces in plain ChatML before
SFT). A mixture names such a source as ``chat:PATH`` (a JSONL file of records in the `messages`
format); `build_chat_shards` renders each record in plain ChatML and writes it as one document
of ordinary shards, so a stage can weight it like any other source::

    <|im_start|>system\\n...<|im_end|>\\n            (when there is a system message)
    <|im_start|>user\\n...<|im_end|>\\n
    <|im_start|>assistant\\n<think>\\n...\\n</think>\\nanswer<|im_end|>\\n
    <|im_start|>tool\\n...<|im_end|>\\n                (tool results)

Reasoning (``reasoning_content``, ``reasoning`` or ``thinking``) goes in a ``<think>`` block;
tool calls as ``<tool_call>{"name": ..., "arguments": ...}</tool_call>``. ``<|im_start|>`` and
``<|im_end|>`` become their special-token ids; the messages' own text is encoded literally (a
message that contains ``<|im_end|>`` cannot forge a turn). A record that is not a list of
messages with string roles and contents is named (``file:line``), counted and left out.
No chat template is involved: this is a data format, not the SFT rendering.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from crucible.data.shards import write_id_shards
from crucible.tokenizer.train import eos_id, load_tokenizer

CHAT_PREFIX = "chat:"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
ROLES = ("system", "user", "assistant", "tool")
REASONING_FIELDS = ("reasoning_content", "reasoning", "thinking")
CHAT_CACHE_VERSION = 1


@dataclass
class ChatDocs:
    """What rendering a file gave: the rendered turns of each usable record, and the rest."""

    documents: list[list[tuple[str, str]]] = field(default_factory=list)  # [(role, body), ...]
    bad: list[tuple[str, str]] = field(default_factory=list)  # (file:line, reason)


def _tool_calls(calls: Any) -> str:
    out = []
    for c in calls:
        fn = c.get("function", c) if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise ValueError("a tool call without a function name")
        args = fn.get("arguments", {})
        if isinstance(args, str):
            args = json.loads(args)
        body = json.dumps({"name": fn["name"], "arguments": args}, ensure_ascii=False)
        out.append(f"<tool_call>\n{body}\n</tool_call>")
    return "\n".join(out)


def render_turns(record: Any) -> list[tuple[str, str]]:
    """A record's turns as (role, text) in plain ChatML; ValueError says what is wrong."""
    messages = record.get("messages") if isinstance(record, dict) else None
    if not isinstance(messages, list) or not messages:
        raise ValueError("no `messages` list")
    turns = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            role = m.get("role") if isinstance(m, dict) else None
            raise ValueError(f"message {i}: role {role!r} is not one of {', '.join(ROLES)}")
        content = m.get("content") or ""
        if not isinstance(content, str):
            raise ValueError(f"message {i}: content is not a string")
        body = content
        if m["role"] == "assistant":
            reasoning = next((m[k] for k in REASONING_FIELDS if m.get(k)), None)
            if reasoning is not None and not isinstance(reasoning, str):
                raise ValueError(f"message {i}: reasoning is not a string")
            calls = m.get("tool_calls") or []
            if calls:
                body = "\n".join(x for x in (content, _tool_calls(calls)) if x)
            if reasoning:
                body = f"<think>\n{reasoning}\n</think>\n{body}"
        if not body.strip():
            raise ValueError(f"message {i}: empty")
        turns.append((m["role"], body))
    return turns


def read_chat_jsonl(path: str | os.PathLike[str]) -> ChatDocs:
    docs = ChatDocs()
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                docs.documents.append(render_turns(json.loads(line)))
            except (ValueError, TypeError, AttributeError) as e:  # JSONDecodeError is a ValueError
                docs.bad.append((where, str(e)))
    return docs


class ChatEncoderIds:
    """Turns to token ids: special tokens as ids, text literally, EOS after the document."""

    def __init__(self, tokenizer_path: str | os.PathLike[str]) -> None:
        tok = load_tokenizer(tokenizer_path)
        ids = {t: tok.token_to_id(t) for t in (IM_START, IM_END)}
        missing = [t for t, i in ids.items() if i is None]
        if missing:
            raise ValueError(
                f"tokenizer {tokenizer_path} has no {' / '.join(missing)} token: chat sources "
                "need the ChatML special tokens (crucible tokenizers reserve them)"
            )
        self.start, self.end = int(ids[IM_START]), int(ids[IM_END])  # type: ignore[arg-type]
        self.eos = eos_id(tok)
        tok.encode_special_tokens = True  # message text never becomes a control token
        tok.no_padding()
        tok.no_truncation()
        self.tok = tok

    def encode(self, turns: list[tuple[str, str]]) -> np.ndarray:
        out: list[int] = []
        for role, body in turns:
            out.append(self.start)
            out += self.tok.encode(f"{role}\n{body}", add_special_tokens=False).ids
            out.append(self.end)
            out += self.tok.encode("\n", add_special_tokens=False).ids
        out.append(self.eos)
        return np.asarray(out, dtype=np.int64)


def _key(path: Path, tokenizer_path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256(f"chat-v{CHAT_CACHE_VERSION}".encode())
    h.update(path.read_bytes())
    h.update(Path(tokenizer_path).read_bytes())
    return h.hexdigest()[:12]


def build_chat_shards(
    spec: str,
    tokenizer_path: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str],
    say: Any = print,
) -> Path:
    """Shards of the conversations of `spec` (``chat:PATH`` or PATH) in the cache; reused when
    the file and the tokenizer are unchanged. ValueError when no record is usable."""
    path = Path(spec.removeprefix(CHAT_PREFIX))
    if not path.is_file():
        raise FileNotFoundError(f"chat source {spec}: no such file")
    root = Path(cache_dir) / f"chat-{path.stem}-{_key(path, tokenizer_path)}"
    if (root / "chat.json").is_file():
        return root
    docs = read_chat_jsonl(path)
    if not docs.documents:
        shown = "; ".join(f"{w}: {r}" for w, r in docs.bad[:3])
        raise ValueError(f"chat source {spec}: no usable conversation ({shown})")
    enc = ChatEncoderIds(tokenizer_path)
    tmp = root.with_name(f".{root.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        meta = write_id_shards(_encoded(enc, docs.documents), tokenizer_path, tmp, prefix="chat")
        info = {
            "source": str(path),
            "conversations": len(docs.documents),
            "left_out": [{"record": w, "reason": r} for w, r in docs.bad],
            "tokens": meta["total_tokens"],
        }
        (tmp / "chat.json").write_text(json.dumps(info, indent=1) + "\n")
        try:
            os.replace(tmp, root)
        except OSError:  # another process built it first
            if not (root / "chat.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    say(
        f"  chat source {path}: {len(docs.documents)} conversations, {meta['total_tokens']:,} "
        f"tokens (plain ChatML, full-sequence loss)"
        + (
            f"; {len(docs.bad)} left out (first: {docs.bad[0][0]}: {docs.bad[0][1]})"
            if docs.bad
            else ""
        )  # fmt: skip
    )
    return root


def _encoded(enc: ChatEncoderIds, documents: list[list[tuple[str, str]]]) -> Iterator[np.ndarray]:
    for turns in documents:
        yield enc.encode(turns)
