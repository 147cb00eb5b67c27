"""Generate until a stop string, an end-of-text token, or a token budget (KV-cached, one prompt)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from crucible.evaluate.lm import EvalLM


@dataclass(frozen=True)
class Generation:
    text: str  # the completion, cut before the first stop string
    stopped: bool  # False: the budget ran out before any stop string or end-of-text token


def generate_until(
    lm: EvalLM,
    prompt: str,
    stop: list[str],
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
) -> Generation:
    """Greedy (temperature 0) or sampled continuation of `prompt`.

    A generation that never stops is cut at max_new_tokens (or the context length) and reported
    with stopped=False, so callers can count it instead of hanging.
    """
    ids = lm.tokenizer.encode(prompt) or [lm.prefix_id]
    budget = max(1, min(max_new_tokens, lm.max_len // 2))
    ids = ids[-(lm.max_len - budget) :]  # keep the end of a long prompt: it holds the question
    new: list[int] = []
    with lm.eval_mode():
        state, logits = lm.begin(torch.tensor([ids]), len(ids) + budget)
        while True:
            if temperature <= 0:
                token = int(logits[0].argmax())
            else:
                probs = torch.softmax(logits[0] / temperature, -1).cpu()
                token = int(torch.multinomial(probs, 1, generator=generator))
            if token == lm.tokenizer.eos_id:
                return Generation(lm.tokenizer.decode(new), True)
            new.append(token)
            text = lm.tokenizer.decode(new)
            cut = min((text.find(s) for s in stop if s and s in text), default=-1)
            if cut >= 0:
                return Generation(text[:cut], True)
            if len(new) >= budget:
                return Generation(text, False)
            state, step_logits = lm.extend(state, torch.tensor([[token]]))
            logits = step_logits[:, -1]
