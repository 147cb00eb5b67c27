"""Log-probabilities of given tokens under a model's logits.

Causal-LM convention: `logits[:, t]` predicts `input_ids[:, t + 1]`. A completion mask marks the
tokens whose probability counts (1 on completion tokens, 0 on prompt and padding), aligned with
`input_ids`; the first position can never be scored, since nothing predicts it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def token_logps(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """log p(targets[..., t]) under softmax(logits[..., t, :] / temperature), computed in fp32.

    No shift: `logits` and `targets` are already aligned (same leading shape).
    """
    if logits.shape[:-1] != targets.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} do not match targets {tuple(targets.shape)}"
        )
    x = logits.float()
    if temperature != 1.0:
        x = x / temperature
    picked = x.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(x, dim=-1)


def shifted_token_logps(
    logits: torch.Tensor, input_ids: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Per-position log-probs of `input_ids[:, 1:]` from `logits[:, :-1]`: shape (B, T - 1)."""
    return token_logps(logits[:, :-1], input_ids[:, 1:], temperature)


@dataclass(frozen=True)
class SequenceLogps:
    """Summed log-probabilities over the masked tokens of each row, and how many tokens counted."""

    logps: torch.Tensor  # (B,)
    n_tokens: torch.Tensor  # (B,) float


def sequence_logps(
    logits: torch.Tensor, input_ids: torch.Tensor, completion_mask: torch.Tensor
) -> SequenceLogps:
    """Sum of log p(token) over each row's completion tokens (the mask aligned with input_ids)."""
    if input_ids.shape != completion_mask.shape:
        raise ValueError(
            f"completion_mask {tuple(completion_mask.shape)} does not match input_ids "
            f"{tuple(input_ids.shape)}"
        )
    per_token = shifted_token_logps(logits, input_ids)
    mask = completion_mask[:, 1:].to(per_token.dtype)
    # where() rather than a product: a masked position with -inf log-prob must not give NaN.
    summed = torch.where(mask > 0, per_token, torch.zeros_like(per_token)).sum(-1)
    return SequenceLogps(summed, mask.sum(-1))
