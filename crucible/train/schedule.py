"""Learning-rate schedules as pure functions of the step, so resuming needs no scheduler state."""

from __future__ import annotations

import math

from crucible.config import ScheduleConfig


def lr_at(step: int, total_steps: int, peak_lr: float, cfg: ScheduleConfig) -> float:
    """LR for optimizer step `step` (0-based) of `total_steps`.

    All schedules warm up linearly from peak/warmup to peak over `warmup_steps`, then:
    constant stays at peak; cosine and linear go from peak to `min_lr` at the last step;
    wsd (warmup-stable-decay) holds peak and decays to `min_lr` over the last `decay_fraction`
    of all steps, with a linear, cosine or 1-sqrt shape.
    """
    if step < cfg.warmup_steps:
        return peak_lr * (step + 1) / cfg.warmup_steps
    if cfg.kind == "constant":
        return peak_lr
    last = max(total_steps - 1, 1)
    if cfg.kind in ("cosine", "linear"):
        span = max(last - cfg.warmup_steps, 1)
        progress = min((step - cfg.warmup_steps) / span, 1.0)
        shape = "cosine" if cfg.kind == "cosine" else "linear"
        return cfg.min_lr + (peak_lr - cfg.min_lr) * _remaining(progress, shape)
    # wsd
    decay_steps = max(round(cfg.decay_fraction * total_steps), 1)
    decay_start = max(total_steps - decay_steps, cfg.warmup_steps)
    if step < decay_start:
        return peak_lr
    progress = min((step - decay_start + 1) / max(total_steps - decay_start, 1), 1.0)
    return cfg.min_lr + (peak_lr - cfg.min_lr) * _remaining(progress, cfg.decay_shape)


def _remaining(progress: float, shape: str) -> float:
    """Fraction of the (peak - min) gap left after `progress` in [0, 1] of the decay."""
    if shape == "linear":
        return 1.0 - progress
    if shape == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - math.sqrt(progress)  # "sqrt": fast early drop, as in WSD's 1-sqrt cooldown
