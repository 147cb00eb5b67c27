"""Autoregressive sampling with a KV cache: one prefill pass, then one token per step."""

from __future__ import annotations

import functools
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
    first_allowed: Tensor | None = None,
) -> Iterator[int]:
    """Yield new tokens one at a time (see `generate`); stops early once `cancel` is set.

    The flag is checked before every forward pass, so a cancelled generation costs at most the
    one token in flight. `first_allowed` (token ids) restricts the first new token to that set
    (token healing, `generate_text`).
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
        logits = model(ids, cache=cache, logits_to_keep=1).logits[0, -1]
        if n == 1 and first_allowed is not None:
            keep = torch.full_like(logits, float("-inf"))
            keep[first_allowed.to(logits.device)] = 0.0
            logits = logits + keep
        token = _sample(logits, temperature, top_k, top_p, generator)
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
    first_allowed: Tensor | None = None,
) -> list[int]:
    """Continue one prompt; return only the new tokens.

    temperature 0 is greedy decoding. Generation stops after max_new_tokens, after an eos token
    (which is included in the result), or when the sequence reaches the model's max_seq_len.
    """
    return list(
        generate_stream(
            model,
            prompt_ids,
            max_new_tokens,
            temperature,
            top_k,
            top_p,
            eos_token_id,
            generator,
            first_allowed=first_allowed,
        )
    )


@functools.lru_cache(maxsize=4)
def token_texts(tokenizer) -> list[str]:
    """The decoded text of every token id (cached for the last few tokenizers)."""
    return tokenizer.decode_batch([[i] for i in range(tokenizer.get_vocab_size())])


def heal_prompt(tokenizer, ids: list[int]) -> tuple[list[int], str, Tensor | None]:
    """Token healing: drop the prompt's last token and allow only continuations of its text.

    A prompt ending in "def " tokenises as ["def", " "], but in training text the space belongs
    to the next word's token (" main"), so a model continuing after a bare " " token is off its
    distribution (the quickstart printed "def  DA"). Backing off one token and requiring the first
    new token to start with the removed text (" ") lets the model pick " main" itself. Returns
    (prompt ids, the removed text, allowed first tokens), or the ids unchanged with no constraint
    when the last token is special or not whole UTF-8.
    """
    if len(ids) < 2:
        return ids, "", None
    tail = tokenizer.decode([ids[-1]])
    if not tail or "\ufffd" in tail:
        return ids, "", None
    texts = token_texts(tokenizer)
    allowed = [i for i, t in enumerate(texts) if t.startswith(tail)]
    return ids[:-1], tail, torch.tensor(allowed, dtype=torch.long)


def generate_text(
    model: Transformer,
    tokenizer,
    prompt: str,
    max_new_tokens: int,
    eos_token_id: int | None = None,
    token_healing: bool = True,
    **sampling,
) -> str:
    """Continue `prompt` with a `tokenizers.Tokenizer`; return only the new text.

    An empty prompt starts a new document (the EOS token, which also separates documents).
    With `token_healing` (default) the prompt's last token is re-chosen by the model among the
    tokens that extend its text (`heal_prompt`); the returned text still starts after `prompt`.
    """
    ids = tokenizer.encode(prompt).ids or [eos_token_id if eos_token_id is not None else 0]
    tail, allowed = "", None
    if token_healing:
        ids, tail, allowed = heal_prompt(tokenizer, ids)
    new = generate(model, ids, max_new_tokens, eos_token_id=eos_token_id,
                   first_allowed=allowed, **sampling)  # fmt: skip
    return tokenizer.decode(new)[len(tail) :]
