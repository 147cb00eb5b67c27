"""The GRPO family: group-relative advantages, the clipped policy loss and its aggregations.

Definitions (TRL's `GRPOTrainer`, which the tests check against):

- advantages: A_i = r_i - mean(group of i); divided by (std + 1e-4) unless scale_rewards is
  "none", with std over the group ("group") or the whole batch ("batch"), Bessel-corrected.
  NaN rewards (every verifier failed) are left out of the statistics and get A = 0.
- ratio ρ_t = exp(logp_t - old_logp_t); per-token loss
  l_t = -min(ρ_t·A, clip(ρ_t, 1-ε, 1+ε_high)·A) + β·k3_t, with the k3 estimator
  k3_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1 of KL(π‖π_ref). With kl_bias_correction
  (TRL 1.16's default, DeepSeek-V3.2) the k3 term is multiplied by ρ_t (not detached), which
  makes its gradient the unbiased reverse-KL gradient; on-policy this changes the gradient only.
- aggregation over the completion mask m:
  grpo    mean over sequences of Σ_t l·m / Σ_t m
  bnpo    Σ l·m / Σ m over the local batch
  dr_grpo Σ l·m / (B · max_completion_length)
  dapo    Σ l·m / num_items (the active tokens of the whole optimizer step, every micro-batch)
  grpo, bnpo and dr_grpo are further divided by the gradient-accumulation steps; dapo's
  num_items already spans them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from crucible.config import ConfigError

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SCALE_REWARDS = ("none", "group", "batch")
ADVANTAGE_EPS = 1e-4


def validate_group_size(batch_size: int, group_size: int, where: str = "grpo") -> None:
    """A batch must hold whole groups: G completions of each prompt."""
    if group_size < 2:
        raise ConfigError(
            f"{where}.group_size: must be >= 2 (advantages compare completions of a prompt), "
            f"got {group_size}"
        )
    if batch_size < 1 or batch_size % group_size:
        raise ConfigError(
            f"{where}.group_size: {group_size} must divide the batch of {batch_size} completions "
            f"(batch = prompts x group_size)"
        )


def check_grpo_options(
    loss_type: str,
    scale_rewards: str = "group",
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    beta: float = 0.0,
    max_completion_length: int | None = None,
) -> None:
    if loss_type not in LOSS_TYPES:
        raise ConfigError(f"loss_type: {loss_type!r} is not one of {', '.join(LOSS_TYPES)}")
    if scale_rewards not in SCALE_REWARDS:
        raise ConfigError(
            f"scale_rewards: {scale_rewards!r} is not one of {', '.join(SCALE_REWARDS)}"
        )
    if not 0.0 <= epsilon < 1.0:
        raise ConfigError(f"epsilon: must be in [0, 1), got {epsilon}")
    if epsilon_high is not None and epsilon_high < 0:
        raise ConfigError(f"epsilon_high: must be >= 0, got {epsilon_high}")
    if beta < 0:
        raise ConfigError(f"beta: must be >= 0, got {beta}")
    if loss_type == "dr_grpo" and (max_completion_length is None or max_completion_length < 1):
        raise ConfigError("max_completion_length: the dr_grpo loss needs a positive value")


def _nanstd(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Bessel-corrected std ignoring NaN; NaN where fewer than two values are present."""
    keep = ~torch.isnan(x)
    if dim is None:
        x, keep, dim = x.reshape(-1), keep.reshape(-1), 0
    n = keep.sum(dim, keepdim=True)
    mean = torch.where(keep, x, 0.0).sum(dim, keepdim=True) / n
    sq = torch.where(keep, (x - mean) ** 2, 0.0).sum(dim, keepdim=True)
    std = (sq / (n - 1)).sqrt()
    return torch.where(n > 1, std, torch.full_like(std, float("nan"))).squeeze(dim)


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale_rewards: str = "group"
) -> torch.Tensor:
    """Advantages of N = prompts × group_size rewards, groups contiguous; NaN rewards -> 0."""
    if scale_rewards not in SCALE_REWARDS:
        raise ConfigError(
            f"scale_rewards: {scale_rewards!r} is not one of {', '.join(SCALE_REWARDS)}"
        )
    validate_group_size(rewards.numel(), group_size)
    r = rewards.reshape(-1, group_size).double()
    mean = torch.nanmean(r, dim=1, keepdim=True)
    adv = r - mean
    if scale_rewards == "group":
        adv = adv / (_nanstd(r, dim=1).unsqueeze(1) + ADVANTAGE_EPS)
    elif scale_rewards == "batch":
        adv = adv / (_nanstd(r) + ADVANTAGE_EPS)
    return torch.nan_to_num(adv, nan=0.0).reshape(-1).to(rewards.dtype)


def combine_rewards(
    per_verifier: Sequence[Sequence[float | None]], weights: Sequence[float] | None = None
) -> torch.Tensor:
    """Weighted sum over verifiers per completion; None is skipped, all-None gives NaN."""
    if not per_verifier:
        raise ValueError("combine_rewards needs at least one verifier's rewards")
    w = list(weights) if weights is not None else [1.0] * len(per_verifier)
    if len(w) != len(per_verifier):
        raise ConfigError(
            f"reward_weights: {len(w)} weights for {len(per_verifier)} reward functions"
        )
    n = len(per_verifier[0])
    if any(len(values) != n for values in per_verifier):
        raise ValueError("every verifier must score every completion")
    totals: list[float] = []
    for i in range(n):
        scored = [wt * float(v[i]) for v, wt in zip(per_verifier, w) if v[i] is not None]
        totals.append(sum(scored) if scored else float("nan"))
    return torch.tensor(totals, dtype=torch.float32)


def truncated(
    completions: Sequence[Sequence[int]], eos_ids: Sequence[int], pad_id: int | None
) -> torch.Tensor:
    """True for completions whose last token is neither an end-of-sequence nor padding."""
    stop = set(eos_ids) | ({pad_id} if pad_id is not None else set())
    return torch.tensor([len(c) > 0 and c[-1] not in stop for c in completions], dtype=torch.bool)


def mask_truncated(completion_mask: torch.Tensor, is_truncated: torch.Tensor) -> torch.Tensor:
    """Zero the loss mask of truncated completions (they carry no end-of-answer signal)."""
    return completion_mask * (~is_truncated.to(completion_mask.device)).unsqueeze(1).to(
        completion_mask.dtype
    )


def soft_overlong_penalty(
    lengths: Sequence[int], max_length: int, cache_length: int
) -> list[float]:
    """DAPO's soft overlong punishment (Eq. 13), a reward added to the verifiers':

    0 up to max_length - cache_length tokens, then falling linearly to -1 at max_length, and -1
    beyond it.
    """
    if max_length < 1 or not 0 <= cache_length <= max_length:
        raise ConfigError(
            f"overlong_penalty: need 0 <= cache_length <= max_length and max_length >= 1 "
            f"(got max_length={max_length}, cache_length={cache_length})"
        )
    free = max_length - cache_length
    out = []
    for n in lengths:
        if n <= free:
            out.append(0.0)
        elif n <= max_length:
            out.append((free - n) / cache_length)
        else:
            out.append(-1.0)
    return out


@dataclass(frozen=True)
class PolicyLoss:
    loss: torch.Tensor  # scalar to backpropagate
    per_token_loss: torch.Tensor  # (B, T), before masking
    per_token_kl: torch.Tensor | None  # (B, T) k3, when beta > 0
    ratio: torch.Tensor  # (B, T) exp(logp - old_logp)
    clipped_low: torch.Tensor  # (B, T) bool: ratio < 1-ε with A < 0
    clipped_high: torch.Tensor  # (B, T) bool: ratio > 1+ε_high with A > 0

    def metrics(self, mask: torch.Tensor) -> dict[str, float]:
        m = mask.to(self.per_token_loss.dtype)
        n = m.sum().clamp(min=1.0)

        def masked_mean(x: torch.Tensor) -> float:
            return float((x.to(m.dtype) * m).sum() / n)

        out = {
            "loss": float(self.loss.detach()),
            "clip_ratio/low_mean": masked_mean(self.clipped_low),
            "clip_ratio/high_mean": masked_mean(self.clipped_high),
        }
        if self.per_token_kl is not None:
            out["kl"] = masked_mean(self.per_token_kl.detach())
        return out


def per_token_policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    *,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    beta: float = 0.0,
    ref_logps: torch.Tensor | None = None,
    kl_bias_correction: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(per-token loss, per-token k3 KL or None, ratio); `old_logps=None` means on-policy."""
    old = logps.detach() if old_logps is None else old_logps
    adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    ratio = torch.exp(logps - old)
    eps_high = epsilon if epsilon_high is None else epsilon_high
    clipped = torch.clamp(ratio, 1.0 - epsilon, 1.0 + eps_high)
    loss = -torch.minimum(ratio * adv, clipped * adv)
    kl = None
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("beta > 0 needs the reference model's per-token log-probs")
        diff = ref_logps - logps
        kl = torch.exp(diff) - diff - 1.0
        if kl_bias_correction:
            kl = kl * ratio
        loss = loss + beta * kl
    return loss, kl, ratio


def aggregate_loss(
    per_token_loss: torch.Tensor,
    mask: torch.Tensor,
    loss_type: str,
    *,
    max_completion_length: int | None = None,
    num_items: float | torch.Tensor | None = None,
    grad_accum_steps: int = 1,
) -> torch.Tensor:
    """Reduce a (B, T) per-token loss to the scalar of `loss_type` (see the module docstring)."""
    m = mask.to(per_token_loss.dtype)
    total = (per_token_loss * m).sum()
    if loss_type == "grpo":
        per_seq = (per_token_loss * m).sum(-1) / m.sum(-1).clamp(min=1.0)
        return per_seq.mean() / grad_accum_steps
    if loss_type == "bnpo":
        return total / m.sum().clamp(min=1.0) / grad_accum_steps
    if loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ConfigError("max_completion_length: the dr_grpo loss needs it")
        return total / (per_token_loss.size(0) * max_completion_length) / grad_accum_steps
    if loss_type == "dapo":
        n = m.sum() if num_items is None else torch.as_tensor(num_items).to(m)
        return total / n.clamp(min=1.0)
    raise ConfigError(f"loss_type: {loss_type!r} is not one of {', '.join(LOSS_TYPES)}")


def policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    loss_type: str = "dapo",
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    beta: float = 0.0,
    ref_logps: torch.Tensor | None = None,
    kl_bias_correction: bool = True,
    max_completion_length: int | None = None,
    num_items: float | torch.Tensor | None = None,
    grad_accum_steps: int = 1,
) -> PolicyLoss:
    """The GRPO-family loss of one micro-batch of completion tokens (all tensors (B, T))."""
    check_grpo_options(
        loss_type,
        epsilon=epsilon,
        epsilon_high=epsilon_high,
        beta=beta,
        max_completion_length=max_completion_length if loss_type == "dr_grpo" else 1,
    )
    per_token, kl, ratio = per_token_policy_loss(
        logps,
        old_logps,
        advantages,
        epsilon=epsilon,
        epsilon_high=epsilon_high,
        beta=beta,
        ref_logps=ref_logps,
        kl_bias_correction=kl_bias_correction,
    )
    loss = aggregate_loss(
        per_token,
        mask,
        loss_type,
        max_completion_length=max_completion_length,
        num_items=num_items,
        grad_accum_steps=grad_accum_steps,
    )
    adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    eps_high = epsilon if epsilon_high is None else epsilon_high
    return PolicyLoss(
        loss=loss,
        per_token_loss=per_token,
        per_token_kl=kl,
        ratio=ratio.detach(),
        clipped_low=(ratio.detach() < 1 - epsilon) & (adv < 0),
        clipped_high=(ratio.detach() > 1 + eps_high) & (adv > 0),
    )
