"""On-policy distillation (GKD): the generalized Jensen-Shannon divergence, and lmbda.

With student and teacher token distributions S and T (softmax of logits / temperature):

- beta = 0: KL(T ‖ S), the forward KL (supervised distillation);
- beta = 1: KL(S ‖ T), the reverse KL (mode-seeking, "on-policy distillation");
- otherwise, with the mixture M = beta·T + (1 - beta)·S:
  JSD_beta = beta·KL(T ‖ M) + (1 - beta)·KL(S ‖ M).

(As in TRL, the two ends are the KLs themselves, not the limits of JSD_beta, which vanish.)
Values are summed over the vocabulary, then over the unmasked tokens; "batchmean" divides by
the number of unmasked tokens, `num_items` by a given count (gradient-accumulation correct).

lmbda is the share of training batches whose completions the student generates itself; the
rest use the dataset's completions.
"""

from __future__ import annotations

import math
import random

import torch

from crucible.config import ConfigError

REDUCTIONS = ("batchmean", "sum", "mean", "none")
IGNORE_INDEX = -100


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(P ‖ Q) per position, summed over the last (vocabulary) axis; 0·log 0 = 0."""
    p = log_p.exp()
    terms = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))
    return terms.sum(-1)


def check_distill_options(beta: float, temperature: float, lmbda: float = 0.0) -> None:
    if not 0.0 <= beta <= 1.0:
        raise ConfigError(f"beta: must be in [0, 1] (0 forward KL, 1 reverse KL), got {beta}")
    if not temperature > 0:
        raise ConfigError(f"temperature: must be > 0, got {temperature}")
    if not 0.0 <= lmbda <= 1.0:
        raise ConfigError(
            f"lmbda: must be in [0, 1] (share of student-generated batches), got {lmbda}"
        )


def per_token_jsd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    beta: float = 0.5,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Generalized JSD at every position: shape = logits shape without the vocabulary axis."""
    check_distill_options(beta, temperature)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ (the tokenizers must match)"
        )
    log_s = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    log_t = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if beta == 0.0:
        return _kl(log_t, log_s)
    if beta == 1.0:
        return _kl(log_s, log_t)
    log_m = torch.logaddexp(log_t + math.log(beta), log_s + math.log1p(-beta))
    return beta * _kl(log_t, log_m) + (1.0 - beta) * _kl(log_s, log_m)


def generalized_jsd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    num_items: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """GKD's loss over (B, T, V) logits; positions with labels == -100 are left out.

    Reductions: "batchmean" = sum / unmasked tokens (or / B without labels), "sum", "mean" =
    sum / (tokens · vocabulary), "none" = per-token values of the unmasked positions.
    `num_items`, when given, replaces the reduction: sum / num_items.
    """
    if reduction not in REDUCTIONS:
        raise ConfigError(f"reduction: {reduction!r} is not one of {', '.join(REDUCTIONS)}")
    jsd = per_token_jsd(student_logits, teacher_logits, beta, temperature)
    if labels is not None:
        jsd = jsd[labels != IGNORE_INDEX]
    if num_items is not None:
        return jsd.sum() / torch.as_tensor(num_items, dtype=jsd.dtype, device=jsd.device)
    if reduction == "batchmean":
        denom = jsd.numel() if labels is not None else jsd.size(0)
        return jsd.sum() / max(denom, 1)
    if reduction == "sum":
        return jsd.sum()
    if reduction == "mean":
        return jsd.sum() / max(jsd.numel() * student_logits.size(-1), 1)
    return jsd


class OnPolicyChooser:
    """Seeded draw per training step: True (the student generates the batch) with chance lmbda."""

    def __init__(self, lmbda: float, seed: int = 0) -> None:
        check_distill_options(0.0, 1.0, lmbda)
        self.lmbda = lmbda
        self._rng = random.Random(seed)

    def __call__(self) -> bool:
        # A draw is made even at lmbda 0 or 1, so the sequence does not depend on lmbda's value.
        return self._rng.random() < self.lmbda

    def state(self) -> object:
        return self._rng.getstate()

    def restore(self, state: object) -> None:
        self._rng.setstate(state)  # type: ignore[arg-type]
