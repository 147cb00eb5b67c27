"""From files to SFT examples in one call: read, validate, render, tokenize, label, report.

`load_sft_data` is what an SFT run (or `crucible chat-inspect`) does before training: every input
is read with the conversation readers (broken records named and counted), tokenized with the chat
template (problem conversations named and counted), truncated explicitly to ``seq_len + 1``
tokens, and summarised. Then ``SFTLoader(data.examples, seq_len, ..., pad_id=data.pad_id)``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crucible.config import ConfigError
from crucible.posttrain.chat_template import ChatEncoder, ChatTemplate
from crucible.posttrain.conversations import ReadResult, read_conversations
from crucible.posttrain.sft_data import (
    Example,
    LossMode,
    SFTStats,
    Truncation,
    tokenize_conversations,
)
from crucible.tokenizer.train import PAD_TOKEN, load_tokenizer


@dataclass
class SFTData:
    examples: list[Example]
    reads: list[ReadResult]
    stats: SFTStats
    encoder: ChatEncoder

    @property
    def pad_id(self) -> int:
        """The tokenizer's <|pad|> id, else the end-of-turn id (padding is never a target)."""
        pad = self.encoder.tokenizer.token_to_id(PAD_TOKEN)
        return int(pad) if pad is not None else self.encoder.end_of_turn_id

    def summary(self) -> str:
        return "\n".join([*(r.summary() for r in self.reads), self.stats.summary()])


def load_sft_data(
    paths: Sequence[str | os.PathLike[str]],
    tokenizer: str | os.PathLike[str] | Any,
    *,
    seq_len: int | None,
    loss: LossMode = "assistant",
    truncation: Truncation = "drop",
    template: ChatTemplate | str | os.PathLike[str] | None = None,
    template_kwargs: dict[str, Any] | None = None,
    split: str = "train",
) -> SFTData:
    """Examples of all `paths` (JSONL or local HF datasets) for rows of `seq_len` positions.

    tokenizer: a tokenizer.json path (or directory) or a `tokenizers.Tokenizer`; template: a
    ChatTemplate, a Jinja file, or None for the built-in one. A ConfigError when nothing usable
    is left, with the reasons.
    """
    if seq_len is not None and seq_len < 1:
        raise ConfigError(f"seq_len must be >= 1, got {seq_len}")
    if isinstance(tokenizer, str | os.PathLike):
        tokenizer = load_tokenizer(tokenizer)
    if template is None:
        template = ChatTemplate.default()
    elif not isinstance(template, ChatTemplate):
        template = ChatTemplate.from_file(Path(template))
    encoder = ChatEncoder(template, tokenizer)
    if not paths:
        raise ConfigError("no SFT data given")
    reads = [read_conversations(p, split=split) for p in paths]
    convs = [c for r in reads for c in r.conversations]
    examples, stats = tokenize_conversations(
        convs,
        encoder,
        loss=loss,
        max_tokens=seq_len + 1 if seq_len is not None else None,
        truncation=truncation,
        template_kwargs=template_kwargs,
    )
    data = SFTData(examples, reads, stats, encoder)
    if not examples:
        raise ConfigError(f"no usable SFT examples:\n{data.summary()}")
    return data
