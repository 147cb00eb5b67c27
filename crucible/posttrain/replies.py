"""Parse what a model wrote in an assistant turn back into a Message (reasoning, content, calls).

The inverse of the built-in template's assistant rendering: a leading ``<think>...</think>`` is
the reasoning (an empty block is none), ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``
blocks are XML tool calls, ``<code>name(arg=value, ...)</code>`` blocks are Python tool calls
(other code becomes a call of ``python`` with the code as its argument), and the rest is the
content. Text after the end-of-turn token is ignored. Used by chat front ends and evaluations,
which must strip the reasoning before scoring an answer.
"""

from __future__ import annotations

import ast
import json
import re

from crucible.posttrain.chat_template import END_OF_TURN
from crucible.posttrain.conversations import THINK_CLOSE, THINK_OPEN, Message, ToolCall

_XML_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
_CODE_CALL = re.compile(r"<code>\s*(.*?)\s*</code>", re.DOTALL)


def _python_call(code: str) -> ToolCall:
    """`name(k=literal, ...)` as a call of `name`; any other code as a call of `python`."""
    try:
        node = ast.parse(code, mode="eval").body
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.args:
            args = {k.arg: ast.literal_eval(k.value) for k in node.keywords if k.arg}
            if len(args) == len(node.keywords):
                return ToolCall(node.func.id, args)
    except (SyntaxError, ValueError):
        pass
    return ToolCall("python", {"code": code})


def _xml_call(body: str) -> ToolCall | None:
    try:
        obj = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    return ToolCall(obj["name"], args) if isinstance(args, dict) else None


def parse_reply(text: str) -> Message:
    """An assistant Message from generated text (malformed tool calls stay in the content)."""
    text = text.split(END_OF_TURN, 1)[0]
    reasoning = None
    stripped = text.lstrip()
    if stripped.startswith(THINK_OPEN):
        inner, closed, rest = stripped[len(THINK_OPEN) :].partition(THINK_CLOSE)
        inner = inner.strip("\n")
        if closed:
            text = rest.removeprefix("\n")
        else:  # cut off while reasoning: all of it is reasoning
            text = ""
        reasoning = inner or None
    calls: list[ToolCall] = []

    def take_xml(m: re.Match[str]) -> str:
        call = _xml_call(m.group(1))
        if call is None:
            return m.group(0)
        calls.append(call)
        return ""

    def take_code(m: re.Match[str]) -> str:
        calls.append(_python_call(m.group(1)))
        return ""

    content = _CODE_CALL.sub(take_code, _XML_CALL.sub(take_xml, text))
    content = content.strip("\n") if calls else content
    return Message("assistant", content, reasoning, tuple(calls))
