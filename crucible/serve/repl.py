"""`crucible chat`: a terminal conversation that streams the reply token by token.

Commands: /think and /no_think switch the reasoning mode, /system TEXT sets the system prompt
(/system alone clears it), /reset forgets the conversation, /exit (or end of input) leaves.
Ctrl-C stops a reply in progress. When the conversation outgrows the context, the oldest turns
are dropped (the system prompt stays).
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Callable
from dataclasses import replace
from typing import Any, TextIO

from crucible.serve.engine import ChatEngine, Prepared, PromptTooLong, Sampling

HELP = "commands: /think  /no_think  /system TEXT  /reset  /exit"


class ChatSession:
    """The conversation state, separate from the terminal so it can be driven by tests too."""

    def __init__(self, engine: ChatEngine, system: str = "", thinking: bool = True) -> None:
        self.engine = engine
        self.system = system
        self.thinking = thinking
        self.history: list[dict[str, Any]] = []

    def messages(self) -> list[dict[str, Any]]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.history

    def prepare(self, user_text: str, max_tokens: int, note: Callable[[str], None]) -> Prepared:
        """Add the user turn; drop the oldest turns until the prompt fits the context."""
        self.history.append({"role": "user", "content": user_text})
        while True:
            try:
                prepared = self.engine.prepare(self.messages(), self.thinking)
                return replace(prepared, max_new_tokens=min(prepared.max_new_tokens, max_tokens))
            except PromptTooLong:
                if len(self.history) <= 1:
                    self.history.pop()
                    raise
                # Drop the oldest exchange (a user turn and the reply that followed it).
                del self.history[: 2 if len(self.history) > 2 else 1]
                note("(the conversation outgrew the context: dropped the oldest turn)")


def run_repl(
    engine: ChatEngine,
    sampling: Sampling,
    max_tokens: int,
    system: str = "",
    thinking: bool = True,
    stdin: TextIO | None = None,
    out: TextIO | None = None,
) -> int:
    stdin = stdin or sys.stdin
    out = out or sys.stdout
    session = ChatSession(engine, system, thinking)
    interactive = stdin.isatty()
    if interactive:
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401  (line editing and arrow-key history for input())

    def say(text: str = "", end: str = "\n") -> None:
        out.write(text + end)
        out.flush()

    mode = "think" if thinking else "no_think"
    say(f"crucible chat: context {engine.context_length} tokens, mode /{mode}. {HELP}")
    while True:
        if interactive:
            try:
                line = input("you> ")
            except EOFError:
                say()
                return 0
            except KeyboardInterrupt:
                say()
                continue
        else:
            say("you> ", end="")
            line = stdin.readline()
            if not line:
                say()
                return 0
            line = line.rstrip("\n")
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            cmd, _, arg = text.partition(" ")
            if cmd == "/exit" or cmd == "/quit":
                return 0
            if cmd in ("/think", "/no_think"):
                session.thinking = cmd == "/think"
                say(f"(mode {cmd})")
            elif cmd == "/system":
                session.system = arg.strip()
                say(
                    f"(system prompt: {session.system!r})"
                    if session.system
                    else "(no system prompt)"
                )
            elif cmd == "/reset":
                session.history.clear()
                say("(conversation cleared)")
            else:
                say(f"(unknown command {cmd}; {HELP})")
            continue
        try:
            prepared = session.prepare(text, max_tokens, say)
        except PromptTooLong as e:
            say(f"(message not sent: {e})")
            continue
        _reply(session, prepared, sampling, say)


def _reply(
    session: ChatSession, prepared: Prepared, sampling: Sampling, say: Callable[..., None]
) -> None:
    cancel = threading.Event()
    content, section = "", ""
    say("bot> ", end="")
    try:
        with contextlib.closing(session.engine.stream(prepared, sampling, cancel)) as events:
            for event in events:
                if event.reasoning:
                    if section != "reasoning":
                        say("[reasoning] ", end="")
                        section = "reasoning"
                    say(event.reasoning, end="")
                if event.content:
                    if section == "reasoning":
                        say("\n[reply] ", end="")
                    section = "content"
                    content += event.content
                    say(event.content, end="")
                if event.finish_reason == "length":
                    say(" [max tokens]", end="")
    except KeyboardInterrupt:
        cancel.set()
        say(" [stopped]")
        session.history.pop()  # an interrupted turn is not part of the conversation
        return
    say()
    # The reasoning was shown; it is not sent back (templates drop earlier turns' reasoning).
    session.history.append({"role": "assistant", "content": content})
