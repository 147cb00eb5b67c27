"""On-policy sampling for RL, preference data and distillation: batched, with the KV cache.

`sample_completions` continues several prompts at once. Prompts of equal length share one batch
(no padding is needed, so a row's logits are exactly those of generating it alone); each batch
is one prefill pass and then one cached forward pass per new token. A row stops at an end token
(kept in its completion) or at `max_new_tokens`; rows that stopped are fed padding that nothing
reads, and the batch ends when every row has stopped.

`ChatPrompter` turns chat messages into prompt ids with the chat template (generation prompt
included) and generated ids back into text.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from crucible.posttrain.chat_template import ChatEncoder, ChatTemplate
from crucible.posttrain.conversations import Conversation, Message
from crucible.tokenizer.train import EOS_TOKEN


@torch.no_grad()
def _sample_rows(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    rows: int,
    max_new_tokens: int,
    stop_ids: set[int],
    pad_id: int,
    temperature: float,
    top_k: int | None,
    generator: torch.Generator | None,
) -> list[list[int]]:
    """`rows` completions of each of `prompts` (all of one length), grouped by prompt."""
    device = next(model.parameters()).device
    P = len(prompts[0])
    budget = min(max_new_tokens, model.cfg.max_seq_len - P)
    if budget <= 0:
        raise ValueError(f"a prompt of {P} tokens leaves no room in max_seq_len")
    ids = torch.tensor(prompts, dtype=torch.long, device=device).repeat_interleave(rows, 0)
    B = ids.shape[0]
    cache = model.new_cache(batch_size=B, max_len=P + budget)
    out = torch.full((B, budget), pad_id, dtype=torch.long)
    done = torch.zeros(B, dtype=torch.bool)
    lengths = torch.full((B,), budget, dtype=torch.long)
    stops = torch.tensor(sorted(stop_ids), dtype=torch.long)
    for t in range(budget):
        logits = model(ids, cache=cache, logits_to_keep=1).logits[:, -1].float().cpu()
        if temperature <= 0:
            nxt = logits.argmax(-1)
        else:
            logits = logits / temperature
            if top_k is not None and top_k < logits.shape[-1]:
                kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        out[:, t] = nxt
        ended = ~done & torch.isin(nxt, stops)
        lengths[ended] = t + 1
        done |= ended
        if bool(done.all()) or t == budget - 1:
            break
        ids = nxt.unsqueeze(1).to(device)
    return [out[i, : int(lengths[i])].tolist() for i in range(B)]


def sample_completions(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    n: int,
    max_new_tokens: int,
    stop_ids: Sequence[int],
    pad_id: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    max_batch_rows: int = 64,
) -> list[list[int]]:
    """`n` completions of each prompt, grouped: result[i * n + j] is the j-th of prompt i.

    Deterministic for a given generator state (prompts are processed in order of first
    appearance of their length, a seeded draw per row and step).
    """
    if n < 1:
        raise ValueError("n must be >= 1")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    was_training = model.training
    model.eval()
    result: list[list[int] | None] = [None] * (len(prompts) * n)
    by_len: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_len.setdefault(len(p), []).append(i)
    per_batch = max(1, max_batch_rows // n)
    stop = set(int(s) for s in stop_ids)
    try:
        for idx in by_len.values():
            for k in range(0, len(idx), per_batch):
                chunk = idx[k : k + per_batch]
                rows = _sample_rows(model, [list(prompts[i]) for i in chunk], n, max_new_tokens,
                                    stop, pad_id, temperature, top_k, generator)  # fmt: skip
                for j, i in enumerate(chunk):
                    result[i * n : (i + 1) * n] = rows[j * n : (j + 1) * n]
    finally:
        model.train(was_training)
    return [r for r in result if r is not None]


@dataclass
class ChatPrompter:
    """Chat messages -> prompt ids (with the generation prompt); generated ids -> reply text."""

    encoder: ChatEncoder

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, template: str | None = None) -> ChatPrompter:
        tpl = ChatTemplate.default() if template is None else ChatTemplate.from_file(template)
        return cls(ChatEncoder(tpl, tokenizer))

    @property
    def end_of_turn_id(self) -> int:
        return self.encoder.end_of_turn_id

    @property
    def stop_ids(self) -> list[int]:
        eos = self.encoder.tokenizer.token_to_id(EOS_TOKEN)
        return [self.end_of_turn_id] + ([int(eos)] if eos is not None else [])

    @property
    def pad_id(self) -> int:
        from crucible.tokenizer.train import PAD_TOKEN

        pad = self.encoder.tokenizer.token_to_id(PAD_TOKEN)
        return int(pad) if pad is not None else self.end_of_turn_id

    def prompt_ids(
        self,
        messages: Sequence[Mapping[str, Any]],
        template_kwargs: Mapping[str, Any] | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        name: str = "<prompt>",
    ) -> list[int]:
        conv = Conversation(
            tuple(_message(m) for m in messages),
            tuple(tools) if tools else None,
            dict(template_kwargs or {}),
            name,
        )
        return self.encoder.encode(conv, add_generation_prompt=True).ids

    def text(self, completion: Sequence[int]) -> str:
        """The reply text, without the end-of-turn token and what follows it."""
        ids = list(completion)
        stops = set(self.stop_ids)
        for k, t in enumerate(ids):
            if t in stops:
                ids = ids[:k]
                break
        return self.encoder.tokenizer.decode(ids, skip_special_tokens=False)


def _message(m: Mapping[str, Any]) -> Message:
    return Message(
        str(m.get("role", "user")),
        str(m.get("content") or ""),
        m.get("reasoning_content") or m.get("reasoning"),
    )
