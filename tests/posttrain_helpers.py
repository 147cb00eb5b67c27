"""Shared inputs of the post-training tests: a small tokenizer and a set of conversations."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

CALCULATOR = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Evaluate an arithmetic expression and return the result.",
        "parameters": {
            "type": "object",
            "properties": {"expression": {"type": "string", "description": "e.g. 2 + 3"}},
            "required": ["expression"],
        },
    },
}


def call(cid: str, expression: str) -> dict[str, Any]:
    return {
        "id": cid,
        "type": "function",
        "function": {"name": "calculator", "arguments": {"expression": expression}},
    }


DAY = {"today_date": "02 March 2026"}

# Think, no-think (kwarg and flag), multi-turn, XML tools, Python tools, /system_override,
# custom instructions, parallel tool calls. Arguments are objects (the template form).
RECORDS: list[dict[str, Any]] = [
    {
        "messages": [
            {"role": "user", "content": "What is 12 + 30?"},
            {"role": "assistant", "content": "42", "reasoning_content": "12 + 30 = 42."},
        ],
        "chat_template_kwargs": dict(DAY),
    },
    {
        "messages": [
            {"role": "user", "content": "Name a sorting function in Python."},
            {"role": "assistant", "content": "sorted()"},
        ],
        "chat_template_kwargs": {**DAY, "enable_thinking": False},
    },
    {
        "messages": [
            {"role": "system", "content": "You are a terse tutor. /no_think"},
            {"role": "user", "content": "What does len do?"},
            {"role": "assistant", "content": "It returns the number of items."},
            {"role": "user", "content": "And abs?"},
            {"role": "assistant", "content": "The absolute value."},
            {"role": "user", "content": "Thanks!"},
            {"role": "assistant", "content": "You're welcome."},
        ],
        "chat_template_kwargs": dict(DAY),
    },
    {
        "messages": [
            {"role": "user", "content": "Compute 347 * 29."},
            {
                "role": "assistant",
                "content": "",
                "reasoning_content": "Large product: use the calculator.",
                "tool_calls": [call("c1", "347 * 29")],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "10063"},
            {
                "role": "assistant",
                "content": "347 * 29 = 10063.",
                "reasoning_content": "The tool returned 10063.",
            },
        ],
        "tools": [CALCULATOR],
        "chat_template_kwargs": dict(DAY),
    },
    {
        "messages": [
            {"role": "user", "content": "What is 81 - 17?"},
            {
                "role": "assistant",
                "content": "Let me run it.",
                "tool_calls": [call("p1", "81 - 17")],
            },
            {"role": "tool", "tool_call_id": "p1", "content": "64"},
            {"role": "assistant", "content": "64"},
        ],
        "chat_template_kwargs": {**DAY, "enable_thinking": False, "python_tools": [CALCULATOR]},
    },
    {
        "messages": [
            {"role": "system", "content": "/system_override You are Bob, a pirate. /think"},
            {"role": "user", "content": "Who are you?"},
            {"role": "assistant", "content": "Arr, Bob!", "reasoning_content": "Stay in role."},
        ],
        "chat_template_kwargs": dict(DAY),
    },
    {
        "messages": [
            {"role": "user", "content": "Say hi to Zoë in 日本語."},
            {
                "role": "assistant",
                "content": "こんにちは、Zoë! 👋",
                "reasoning_content": "Greet back.",
            },
        ],
        "chat_template_kwargs": {
            **DAY,
            "custom_instructions": "Always be cheerful. Toujours gai, même à Noël ☃.",
            "knowledge_cutoff": "October 2025",
        },
    },
    {
        "messages": [
            {"role": "system", "content": "Use the tools when numbers are large."},
            {"role": "user", "content": "Add 1234 + 5678 and multiply 12 * 34."},
            {
                "role": "assistant",
                "content": "",
                "reasoning_content": "Two independent calls.",
                "tool_calls": [call("a", "1234 + 5678"), call("b", "12 * 34")],
            },
            {"role": "tool", "tool_call_id": "a", "content": "6912"},
            {"role": "tool", "tool_call_id": "b", "content": "408"},
            {
                "role": "assistant",
                "content": "6912 and 408.",
                "reasoning_content": "Both results are in.",
            },
        ],
        "chat_template_kwargs": {**DAY, "xml_tools": [CALCULATOR]},
    },
]


def records() -> list[dict[str, Any]]:
    return copy.deepcopy(RECORDS)


def train_small_tokenizer(out_dir: Path, vocab_size: int = 512) -> Path:
    """A byte-level BPE with the chat special tokens, trained in well under a second."""
    from crucible.data.corpora import iter_stdlib_documents
    from crucible.tokenizer.train import LAB_SPECIAL_TOKENS, train_tokenizer

    texts = [d.text for d in iter_stdlib_documents("val", max_bytes=200_000)]
    texts += [m["content"] for r in RECORDS for m in r["messages"]]
    return train_tokenizer(texts, vocab_size, out_dir, special_tokens=LAB_SPECIAL_TOKENS)
