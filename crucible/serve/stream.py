"""Token ids to text increments, and text increments to reasoning / reply increments.

A byte-level token can end in the middle of a multi-byte UTF-8 character, so a token's text is not
known until the character completes. `IncrementalDecoder` decodes the growing sequence (a short
window of it: the decoded text of byte-level BPE concatenates) and emits only the new suffix once
it no longer ends in an incomplete character.
"""

from __future__ import annotations

from tokenizers import Tokenizer

from crucible.serve.renderer import ChatRenderer, Reply

_INCOMPLETE = "\ufffd"  # what decoding yields for a cut UTF-8 sequence


class IncrementalDecoder:
    """Feed token ids one at a time; get back the text each one completes."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tok = tokenizer
        self._ids: list[int] = []
        self._prefix = 0  # window start: a little context before the unread tokens
        self._read = 0  # tokens whose text has been emitted

    def push(self, token: int) -> str:
        self._ids.append(token)
        return self._emit(final=False)

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end)."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        if self._read == len(self._ids):
            return ""
        seen = self._tok.decode(self._ids[self._prefix : self._read])
        text = self._tok.decode(self._ids[self._prefix :])
        if len(text) <= len(seen) or (text.endswith(_INCOMPLETE) and not final):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(seen) :]


class ReplyStream:
    """Split streamed text into reasoning and reply increments with a renderer's `parse`."""

    def __init__(self, renderer: ChatRenderer, enable_thinking: bool) -> None:
        self._renderer = renderer
        self._thinking = enable_thinking
        self.text = ""
        self._sent = Reply("", "")

    def push(self, delta: str) -> Reply:
        self.text += delta
        return self._advance(partial=True)

    def finish(self) -> Reply:
        """The last increments; afterwards `final` holds the whole reply."""
        return self._advance(partial=False)

    @property
    def final(self) -> Reply:
        return self._renderer.parse(self.text, self._thinking)

    def _advance(self, partial: bool) -> Reply:
        now = self._renderer.parse(self.text, self._thinking, partial=partial)
        old = self._sent
        # A renderer keeps partial results prefix-stable; if one ever does not, hold the field.
        reasoning = (
            now.reasoning[len(old.reasoning) :] if now.reasoning.startswith(old.reasoning) else ""
        )
        content = now.content[len(old.content) :] if now.content.startswith(old.content) else ""
        self._sent = Reply(old.reasoning + reasoning, old.content + content)
        return Reply(reasoning, content)
