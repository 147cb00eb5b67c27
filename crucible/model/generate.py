"""Autoregressive sampling with a KV cache: one prefill pass, then one token per step."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Protocol

import torch
from torch import Tensor

from crucible.model.transformer import Transformer


def _sample(
    logits: Tensor,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | None,
) -> int:
    """Pick the next token from fp32 logits [V]."""
    if temperature <= 0:
        return int(logits.argmax())
    logits = logits / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token once the mass before it already reaches top_p (the first always stays).
        drop = (cum - sorted_logits.softmax(-1)) >= top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    if generator is not None:
        probs = probs.to(generator.device)
    return int(torch.multinomial(probs, 1, generator=generator))


class CancelFlag(Protocol):
    """Anything with `is_set()`, e.g. a `threading.Event` set by another thread."""

    def is_set(self) -> bool: ...


@torch.no_grad()
def generate_stream(
    model: Transformer,
    prompt_ids: list[int] | Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | Iterable[int] | None = None,
    generator: torch.Generator | None = None,
    cancel: CancelFlag | None = None,
) -> Iterator[int]:
    """Yield new tokens one at a time (see `generate`); stops early once `cancel` is set.

    The flag is checked before every forward pass, so a cancelled generation costs at most the
    one token in flight.
    """
    prompt = prompt_ids.flatten().tolist() if isinstance(prompt_ids, Tensor) else list(prompt_ids)
    if not prompt:
        raise ValueError("generate needs a non-empty prompt")
    max_len = model.cfg.max_seq_len
    if len(prompt) > max_len:
        raise ValueError(f"prompt of {len(prompt)} tokens exceeds max_seq_len {max_len}")
    budget = min(max_new_tokens, max_len - len(prompt))
    if budget <= 0:
        return
    stop = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or [])
    device = model.embed.weight.device

    cache = model.new_cache(batch_size=1, max_len=len(prompt) + budget)
    ids = torch.tensor([prompt], dtype=torch.long, device=device)
    for n in range(1, budget + 1):
        if cancel is not None and cancel.is_set():
            return
        logits = model(ids, cache=cache, logits_to_keep=1).logits
        token = _sample(logits[0, -1], temperature, top_k, top_p, generator)
        yield token
        # The last token needs no forward pass of its own: nothing would read its logits.
        if token in stop or n == budget:
            return
        ids = torch.tensor([[token]], dtype=torch.long, device=device)


def generate(
    model: Transformer,
    prompt_ids: list[int] | Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | Iterable[int] | None = None,
    generator: torch.Generator | None = None,
) -> list[int]:
    """Continue one prompt; return only the new tokens.

    temperature 0 is greedy decoding. Generation stops after max_new_tokens, after an eos token
    (which is included in the result), or when the sequence reaches the model's max_seq_len.
    """
    return list(
        generate_stream(
            model, prompt_ids, max_new_tokens, temperature, top_k, top_p, eos_token_id, generator
        )
    )


def generate_text(
    model: Transformer,
    tokenizer,
    prompt: str,
    max_new_tokens: int,
    eos_token_id: int | None = None,
    **sampling,
) -> str:
    """Continue `prompt` with a `tokenizers.Tokenizer`; return only the new text.

    An empty prompt starts a new document (the EOS token, which also separates documents).
    """
    ids = tokenizer.encode(prompt).ids or [eos_token_id if eos_token_id is not None else 0]
    new = generate(model, ids, max_new_tokens, eos_token_id=eos_token_id, **sampling)
    return tokenizer.decode(new)
