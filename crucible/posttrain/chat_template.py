"""The chat template: render conversations to token ids and an assistant (loss) mask.

Templates are Jinja2, rendered in a sandbox configured like transformers' ``apply_chat_template``:
``ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)`` with the loop-controls
extension, a ``{% generation %}...{% endgeneration %}`` tag that records which characters the
assistant produced, and the globals ``raise_exception``, ``strftime_now``, ``dict``, ``namespace``
and a ``tojson`` filter that does not HTML-escape. So the same template file gives the same text
here and in transformers, and the default one ships with every chat model's tokenizer files
(`write_chat_template`).

Token ids come from encoding the whole rendered text at once (as transformers does); a token is in
the assistant mask when its characters overlap a generation span. The end-of-turn token must be
inside the mask, or the model never learns to stop: `ChatEncoder` checks that when it is built.
"""

from __future__ import annotations

import json
import os
import sys
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from crucible.config import ConfigError
from crucible.model.hf import _special_tokens
from crucible.posttrain.conversations import Conversation, Message

END_OF_TURN = "<|im_end|>"
TEMPLATE_FILE = "chat_template.jinja"
_TEMPLATE_NAME = "<template>"  # the filename Jinja gives templates compiled from a string

# (rendered text so far, recorded spans) of the render in progress, if it tracks generation.
_tracking: ContextVar[tuple[list[int], list[tuple[int, int]]] | None] = ContextVar(
    "crucible_generation_tracking", default=None
)


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}body{% endgeneration %}``: renders body, records its character span."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        call = self.call_method("_record", [])
        return jinja2.nodes.CallBlock(call, [], [], body).set_lineno(lineno)

    def _record(self, caller: Any) -> str:
        text = caller()
        state = _tracking.get()
        if state is not None:
            length, spans = state
            spans.append((length[0], length[0] + len(text)))
        return text


class _Namespace(jinja2.utils.Namespace):
    """Jinja's namespace without underscore attributes (no reaching into Python internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - Jinja's own signature trick
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for key in attrs:
            _Namespace._check(key)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, key: str, value: Any) -> None:
        _Namespace._check(key)
        jinja2.utils.Namespace.__setitem__(self, key, value)

    @staticmethod
    def _check(key: Any) -> None:
        if isinstance(key, str) and key.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {key!r} is not allowed")


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
    sort_keys: bool = False,
) -> str:  # fmt: skip
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationTag, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals.update(
        raise_exception=_raise_exception,
        strftime_now=_strftime_now,
        dict=lambda *a, **k: dict(*a, **k),
        namespace=_Namespace,
    )
    return env


def _template_line(tb: Any) -> int | None:
    """The template line of the innermost template frame of a traceback."""
    line = None
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == _TEMPLATE_NAME:
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


class TemplateRenderError(ValueError):
    """Rendering one conversation failed; the message names the record and the template line."""


@dataclass
class Rendered:
    text: str
    spans: list[tuple[int, int]]  # character spans of the {% generation %} blocks


class ChatTemplate:
    """A compiled chat template. `source` is the Jinja text, `origin` where it came from."""

    def __init__(self, source: str, origin: str = "chat template") -> None:
        self.source, self.origin = source, origin
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise ConfigError(
                f"{origin} line {e.lineno}: template syntax error: {e.message}"
            ) from None

    @classmethod
    def default(cls) -> ChatTemplate:
        """The shipped hybrid template (crucible/posttrain/templates/chat_template.jinja)."""
        text = resources.files("crucible.posttrain").joinpath("templates", TEMPLATE_FILE)
        return cls(
            text.read_text(encoding="utf-8"), f"crucible/posttrain/templates/{TEMPLATE_FILE}"
        )

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> ChatTemplate:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"chat template not found: {p}")
        return cls(p.read_text(encoding="utf-8"), str(p))

    def render(
        self,
        conversation: Conversation | list[dict[str, Any]],
        *,
        add_generation_prompt: bool = False,
        record: str | None = None,
        **kwargs: Any,
    ) -> Rendered:
        """Render a conversation (or raw template messages) and its generation spans.

        Template variables: messages, tools, add_generation_prompt, the conversation's
        chat_template_kwargs, then `kwargs` (which win).
        """
        if isinstance(conversation, Conversation):
            messages = conversation.template_messages()
            variables: dict[str, Any] = {"tools": list(conversation.tools or []) or None}
            variables.update(conversation.template_kwargs)
            record = record or conversation.name
        else:
            messages, variables = conversation, {"tools": None}
        variables.update(kwargs)
        variables.update(messages=messages, add_generation_prompt=add_generation_prompt)
        variables.setdefault("documents", None)
        length, spans = [0], []
        pieces: list[str] = []
        token = _tracking.set((length, spans))
        try:
            for piece in self._template.generate(**variables):
                pieces.append(piece)
                length[0] += len(piece)
        except jinja2.TemplateError as e:
            line = _template_line(sys.exc_info()[2])
            at = f" line {line}" if line is not None else ""
            name = record or "<conversation>"
            raise TemplateRenderError(f"{name}: {self.origin}{at}: {e.message or e}") from None
        except (TypeError, AttributeError, KeyError, ValueError) as e:
            line = _template_line(sys.exc_info()[2])
            at = f" line {line}" if line is not None else ""
            name = record or "<conversation>"
            raise TemplateRenderError(
                f"{name}: {self.origin}{at}: {type(e).__name__}: {e}"
            ) from None
        finally:
            _tracking.reset(token)
        return Rendered("".join(pieces), spans)


@dataclass
class Encoded:
    ids: list[int]
    mask: list[int]  # 1 where the token is (partly) inside a generation span
    text: str


class ChatEncoder:
    """A template plus a `tokenizers.Tokenizer`: conversations to (ids, assistant mask).

    On construction it checks that the end-of-turn token is one token of the vocabulary and that
    a rendered assistant turn ends its masked span on it (ConfigError otherwise).
    """

    def __init__(self, template: ChatTemplate, tokenizer: Any, end_of_turn: str = END_OF_TURN):
        self.template, self.tokenizer, self.end_of_turn = template, tokenizer, end_of_turn
        eot = tokenizer.token_to_id(end_of_turn)
        if eot is None:
            raise ConfigError(
                f"the tokenizer has no end-of-turn token {end_of_turn!r}: chat models need it "
                "(tokenizers trained by crucible reserve <|im_start|> and <|im_end|>)"
            )
        self.end_of_turn_id = int(eot)
        self.special_tokens = sorted(
            t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special
        )
        # bos_token, eos_token, ...: what an HF export of this tokenizer declares (templates
        # written for transformers may use them).
        self.token_variables = _special_tokens(tokenizer.get_vocab(with_added_tokens=True))
        self._check_end_of_turn_trained()

    def _check_end_of_turn_trained(self) -> None:
        probe = [
            Message("user", "Hello."),
            Message("assistant", "Hi."),
            Message("user", "Bye."),
        ]
        conv = Conversation(tuple(probe), name="end-of-turn probe")
        try:
            enc = self.encode(conv, today_date="1 January 2000")
        except TemplateRenderError as e:
            raise ConfigError(f"cannot render a probe conversation: {e}") from None
        masked = [i for i, m in zip(enc.ids, enc.mask, strict=True) if m]
        while masked and not self.tokenizer.decode([masked[-1]], skip_special_tokens=False).strip():
            masked.pop()  # trailing whitespace after the end-of-turn token is harmless
        if not masked:
            raise ConfigError(
                f"{self.template.origin}: an assistant turn has no tokens in the loss mask; wrap "
                "assistant content and the end-of-turn token in {% generation %}...{% endgeneration %}"
            )
        if masked[-1] != self.end_of_turn_id:
            raise ConfigError(
                f"{self.template.origin}: the end-of-turn token {self.end_of_turn!r} is outside "
                "the assistant mask, so the model would never learn to stop; put it inside "
                "{% generation %}...{% endgeneration %}"
            )

    def encode(
        self,
        conversation: Conversation,
        *,
        add_generation_prompt: bool = False,
        messages: list[dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> Encoded:
        """Token ids and assistant mask of a conversation (or of `messages` in its context)."""
        # Like transformers: the tokenizer's special tokens, then the record's kwargs, then ours.
        variables = {
            **self.token_variables,
            "tools": list(conversation.tools or []) or None,
            **conversation.template_kwargs,
            **kwargs,
        }
        r = self.template.render(
            conversation.template_messages() if messages is None else messages,
            add_generation_prompt=add_generation_prompt,
            record=conversation.name,
            **variables,
        )
        enc = self.tokenizer.encode(r.text, add_special_tokens=False)
        return Encoded(list(enc.ids), mask_from_spans(enc.offsets, r.spans), r.text)

    def contains_special(self, conversation: Conversation) -> str | None:
        """A special token that appears inside the conversation's own text, if any."""
        texts = [
            t
            for m in conversation.messages
            for t in (
                m.content,
                m.reasoning or "",
                *(json.dumps(c.arguments) for c in m.tool_calls),
            )
        ]
        texts.append(json.dumps([conversation.tools, conversation.template_kwargs], default=str))
        for tok in self.special_tokens:
            if any(tok in t for t in texts):
                return tok
        return None


def mask_from_spans(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """1 for each token that ends after a (sorted) span starts and starts before it ends."""
    mask = [0] * len(offsets)
    k = 0
    for i, (start, end) in enumerate(offsets):
        while k < len(spans) and start >= spans[k][1]:
            k += 1
        if k == len(spans):
            break
        if end > spans[k][0]:
            mask[i] = 1
    return mask


def write_chat_template(
    out_dir: str | os.PathLike[str], template: ChatTemplate | None = None
) -> Path:
    """Write ``chat_template.jinja`` into a tokenizer / HF export directory (transformers reads it)."""
    template = template or ChatTemplate.default()
    out = Path(out_dir) / TEMPLATE_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.write_text(template.source, encoding="utf-8")
    os.replace(tmp, out)
    return out
