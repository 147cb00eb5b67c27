"""How a conversation becomes prompt tokens, and how generated text splits into reasoning + reply.

Everything in `crucible.serve` reaches the chat format only through the `ChatRenderer` protocol,
and `renderer_for_run` is the one place that picks an implementation. The built-in
`ChatMLRenderer` is the fallback for runs without a template; a run that ships
``chat_template.jinja`` (every SFT run does) gets a `TemplateRenderer`, which renders with that
template through the post-training `ChatEncoder` (think/no-think system flags, metadata block).

Messages are plain dicts in the OpenAI / transformers shape: ``{"role": ..., "content": ...}``,
optionally with ``"reasoning_content"`` on assistant turns.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from tokenizers import Tokenizer

from crucible.config import ConfigError
from crucible.tokenizer.train import EOS_TOKEN

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
ROLES = ("system", "developer", "user", "assistant", "tool")


@dataclass(frozen=True)
class Reply:
    """A generated assistant turn, split into its reasoning and the visible reply."""

    reasoning: str
    content: str


class ChatRenderer(Protocol):
    """The chat format of a model, as the server and the REPL need it."""

    stop_token_ids: frozenset[int]
    """Tokens that end the assistant turn (end-of-turn and end-of-text)."""

    def render(self, messages: Sequence[Mapping[str, Any]], enable_thinking: bool) -> list[int]:
        """Token ids of the conversation followed by the start of an assistant turn."""
        ...

    def parse(self, text: str, enable_thinking: bool, partial: bool = False) -> Reply:
        """Split generated text (stop token excluded). With `partial`, the text may still grow:
        return only what later text cannot change, so that successive results extend each other
        (this is what streaming relies on)."""
        ...


def message_text(message: Mapping[str, Any]) -> str:
    """The text of a message whose content is a string, None, or a list of text parts."""
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        if not isinstance(part, Mapping) or part.get("type") != "text":
            raise ValueError("only text content parts are supported")
        parts.append(str(part.get("text", "")))
    return "".join(parts)


def _hold_partial_tag(text: str, tag: str) -> str:
    """Drop a trailing proper prefix of `tag` (it may become the tag once more text arrives)."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return text[:-k]
    return text


class ChatMLRenderer:
    """ChatML turns with the tokenizer's reserved ``<|im_start|>`` / ``<|im_end|>`` tokens.

    ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per message, then ``<|im_start|>assistant\\n``.
    Thinking mode lets the model open a ``<think>`` block itself; no-think mode prefills an
    empty one (``<think>\\n\\n</think>\\n``), as SmolLM3 and Qwen3 do. Earlier assistant turns are
    rendered without their reasoning. Message text is encoded with special-token matching off,
    so a user typing ``<|im_end|>`` cannot forge a turn boundary.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        ids = {t: tokenizer.token_to_id(t) for t in (IM_START, IM_END, EOS_TOKEN)}
        missing = [t for t in (IM_START, IM_END) if ids[t] is None]
        if missing:
            raise ConfigError(
                f"tokenizer has no {' / '.join(missing)} token: the built-in chat format needs "
                "the ChatML special tokens that `crucible` tokenizers reserve"
            )
        self._start, self._end = ids[IM_START], ids[IM_END]
        self.stop_token_ids = frozenset(i for i in (ids[IM_END], ids[EOS_TOKEN]) if i is not None)
        # A private copy: text is encoded literally, never as special tokens.
        self._text_tok = Tokenizer.from_str(tokenizer.to_str())
        self._text_tok.encode_special_tokens = True

    def _encode(self, text: str) -> list[int]:
        # Lone surrogates (JSON "\ud800", undecodable terminal bytes) are not UTF-8: replace them.
        text = text.encode("utf-8", "replace").decode("utf-8")
        return self._text_tok.encode(text).ids if text else []

    def render(self, messages: Sequence[Mapping[str, Any]], enable_thinking: bool) -> list[int]:
        ids: list[int] = []
        for m in messages:
            role = m.get("role")
            if role not in ROLES:
                raise ValueError(f"unknown role {role!r}; allowed: {', '.join(ROLES)}")
            role = "system" if role == "developer" else role
            ids += [self._start, *self._encode(f"{role}\n{message_text(m)}"), self._end]
            ids += self._encode("\n")
        ids += [self._start, *self._encode("assistant\n")]
        if not enable_thinking:
            ids += self._encode(f"{THINK_OPEN}\n\n{THINK_CLOSE}\n")
        return ids

    def parse(self, text: str, enable_thinking: bool, partial: bool = False) -> Reply:
        lead = text.lstrip()
        if lead.startswith(THINK_OPEN):
            body = lead[len(THINK_OPEN) :]
            end = body.find(THINK_CLOSE)
            if end < 0:  # still thinking (or stopped while thinking)
                reasoning = _hold_partial_tag(body, THINK_CLOSE) if partial else body
                return Reply(reasoning.strip(), "")
            return Reply(body[:end].strip(), body[end + len(THINK_CLOSE) :].strip())
        if partial and THINK_OPEN.startswith(lead):
            return Reply("", "")  # nothing yet, or the start of "<think>"
        return Reply("", text.strip())


class TemplateRenderer(ChatMLRenderer):
    """A run's own Jinja chat template, rendered exactly as training rendered it.

    Prompt ids are `ChatEncoder.encode(conversation, add_generation_prompt=True,
    enable_thinking=...)`: the same ids an SFT run trained on, up to the assistant turn. The
    template text is tokenized as a whole (special tokens included), so a message that contains
    a special token is refused (ValueError) rather than allowed to forge a turn boundary.
    Replies are parsed as the ChatML renderer parses them (a leading ``<think>`` block).
    """

    def __init__(self, tokenizer: Tokenizer, template_path: Path) -> None:
        from crucible.posttrain.chat_template import ChatEncoder, ChatTemplate

        super().__init__(tokenizer)
        self.encoder = ChatEncoder(ChatTemplate.from_file(template_path), tokenizer)

    def conversation(self, messages: Sequence[Mapping[str, Any]]):  # type: ignore[no-untyped-def]
        """The messages as a posttrain Conversation (developer -> system)."""
        from crucible.posttrain.conversations import Conversation, Message

        out = []
        for m in messages:
            role = m.get("role")
            if role not in ROLES:
                raise ValueError(f"unknown role {role!r}; allowed: {', '.join(ROLES)}")
            role = "system" if role == "developer" else role
            reasoning = m.get("reasoning_content") if role == "assistant" else None
            text = message_text(m).encode("utf-8", "replace").decode("utf-8")
            out.append(Message(role, text, reasoning if isinstance(reasoning, str) else None))
        return Conversation(tuple(out), name="request")

    def render(self, messages: Sequence[Mapping[str, Any]], enable_thinking: bool) -> list[int]:
        from crucible.posttrain.chat_template import TemplateRenderError

        conv = self.conversation(messages)
        special = self.encoder.contains_special(conv)
        if special is not None:
            raise ValueError(f"a message contains the special token {special}")
        try:
            enc = self.encoder.encode(
                conv, add_generation_prompt=True, enable_thinking=enable_thinking
            )
        except TemplateRenderError as e:
            raise ValueError(str(e)) from None
        return enc.ids


def renderer_for_run(run_dir: Path, tokenizer: Tokenizer) -> ChatRenderer:
    """The chat format of a run directory: the one place that chooses a renderer.

    A run that ships ``chat_template.jinja`` (SFT runs, HF exports of them) renders with that
    template; any other run with the built-in ChatML format.
    """
    template = Path(run_dir) / "chat_template.jinja"
    if template.is_file():
        return TemplateRenderer(tokenizer, template)
    return ChatMLRenderer(tokenizer)
