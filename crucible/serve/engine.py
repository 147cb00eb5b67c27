"""One loaded chat model: conversations in, streamed reasoning/reply increments out.

`ChatEngine.stream` runs synchronously (the server calls it in a worker thread, the REPL in its
own); a lock makes concurrent callers take turns, and a cancel flag stops a generation between
two tokens.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from crucible.model import Transformer, generate_stream
from crucible.model.generate import CancelFlag
from crucible.serve.renderer import ChatRenderer, renderer_for_run
from crucible.serve.stream import IncrementalDecoder, ReplyStream


class PromptTooLong(ValueError):
    """The rendered conversation leaves no room to generate within the context length."""


@dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int | None = None
    seed: int | None = None


@dataclass(frozen=True)
class Prepared:
    """A validated request: prompt ids and how many tokens may follow."""

    prompt_ids: list[int]
    max_new_tokens: int
    enable_thinking: bool


@dataclass
class ChatEvent:
    """An increment of the reply; the last event of a stream carries `finish_reason` and usage."""

    reasoning: str = ""
    content: str = ""
    finish_reason: str | None = None  # "stop", "length" or "cancelled"
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class EngineStats:
    """Counters the tests (and a curious operator) can read."""

    requests: int = 0
    cancelled: int = 0
    tokens_generated: int = 0
    thinking_modes: list[bool] = field(default_factory=list)


class ChatEngine:
    def __init__(self, model: Transformer, tokenizer: Tokenizer, renderer: ChatRenderer) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.renderer = renderer
        self.stats = EngineStats()
        self._lock = threading.Lock()

    @property
    def context_length(self) -> int:
        return self.model.cfg.max_seq_len

    def prepare(
        self,
        messages: Sequence[Mapping[str, Any]],
        enable_thinking: bool,
        max_tokens: int | None = None,
    ) -> Prepared:
        """Render and check against the context length (raises `PromptTooLong`, ValueError)."""
        ids = self.renderer.render(messages, enable_thinking)
        room = self.context_length - len(ids)
        if room <= 0:
            raise PromptTooLong(
                f"the conversation is {len(ids)} tokens; this model's context length is "
                f"{self.context_length} tokens, which leaves no room for a reply"
            )
        if max_tokens is not None and max_tokens > room:
            raise PromptTooLong(
                f"the conversation is {len(ids)} tokens and max_tokens is {max_tokens}: together "
                f"over this model's context length of {self.context_length} tokens "
                f"(at most {room} new tokens fit)"
            )
        return Prepared(ids, max_tokens or room, enable_thinking)

    def stream(
        self, request: Prepared, sampling: Sampling, cancel: CancelFlag | None = None
    ) -> Iterator[ChatEvent]:
        """Generate; yield increments as soon as they are decodable, then one final event."""
        with self._lock:
            yield from self._stream_locked(request, sampling, cancel)

    def _stream_locked(
        self, request: Prepared, sampling: Sampling, cancel: CancelFlag | None
    ) -> Iterator[ChatEvent]:
        self.stats.requests += 1
        self.stats.thinking_modes.append(request.enable_thinking)
        device = self.model.embed.weight.device
        generator = torch.Generator(device=device)
        generator.manual_seed(sampling.seed if sampling.seed is not None else generator.seed())
        decoder = IncrementalDecoder(self.tokenizer)
        reply = ReplyStream(self.renderer, request.enable_thinking)
        stop = self.renderer.stop_token_ids
        count, finish = 0, "length"
        tokens = generate_stream(
            self.model,
            request.prompt_ids,
            request.max_new_tokens,
            temperature=sampling.temperature,
            top_k=sampling.top_k,
            top_p=sampling.top_p,
            eos_token_id=stop,
            generator=generator,
            cancel=cancel,
        )
        for token in tokens:
            count += 1
            self.stats.tokens_generated += 1
            if token in stop:
                finish = "stop"
                break
            delta = reply.push(decoder.push(token))
            if delta.reasoning or delta.content:
                yield ChatEvent(delta.reasoning, delta.content)
        if cancel is not None and cancel.is_set() and finish != "stop":
            finish = "cancelled"
            self.stats.cancelled += 1
        reply.push(decoder.flush())
        last = reply.finish()
        yield ChatEvent(
            last.reasoning,
            last.content,
            finish_reason=finish,
            prompt_tokens=len(request.prompt_ids),
            completion_tokens=count,
        )


def load_engine(run_dir: Path, checkpoint: str | None = None, device: str = "cpu") -> ChatEngine:
    """The chat engine of a run directory (latest checkpoint unless one is named)."""
    from crucible.runs import load_run_model
    from crucible.tokenizer.train import load_tokenizer

    run_dir = Path(run_dir)
    model, _, _ = load_run_model(run_dir, checkpoint, device)
    tokenizer = load_tokenizer(run_dir / "tokenizer.json")
    return ChatEngine(model, tokenizer, renderer_for_run(run_dir, tokenizer))
