"""Compute budget: GPUs x days x cost for a token budget, the reverse, and compute-optimal sizing.

Training FLOPs = FLOPs per token (6N + attention, `plan.flops`) x tokens. A GPU delivers
peak x MFU, where the peak is the card's *dense* bf16 figure from `plan.hardware` unless another
is given; every result names the peak it used, because MFU is only meaningful against one.
"""

from __future__ import annotations

from dataclasses import dataclass

from crucible.plan.hardware import Accelerator

# Default MFU of the planner, against the dense bf16 peak, with FLOPs counted as 6N + causal
# attention. SmolLM3 (3B, 384 H100s, 13.5-14k tokens/s per GPU) ran at 27.6-28.7% by that count;
# docs/planning.md compares it with other published runs.
DEFAULT_MFU = 0.28

SECONDS_PER_DAY = 86_400
# SmolLM3's spend (the playbook): ablations and debugging next to the main run, in GPU-hours.
SMOLLM3_EXPERIMENT_GPU_HOURS = 161_000
SMOLLM3_MAIN_RUN_GPU_HOURS = 276_000
SMOLLM3_EXPERIMENT_SHARE = SMOLLM3_EXPERIMENT_GPU_HOURS / (
    SMOLLM3_EXPERIMENT_GPU_HOURS + SMOLLM3_MAIN_RUN_GPU_HOURS
)


class BudgetError(ValueError):
    """A budget that cannot be met as asked; the message says which figure is short."""


@dataclass(frozen=True)
class ComputePlan:
    tokens: float
    flops_per_token: float
    accelerator: str
    peak_flops: float  # the dense peak MFU is measured against
    peak_source: str
    mfu: float
    gpus: int
    days: float
    price_per_gpu_hour: float | None = None

    @property
    def total_flops(self) -> float:
        return self.tokens * self.flops_per_token

    @property
    def gpu_hours(self) -> float:
        return self.gpus * self.days * 24

    @property
    def cost(self) -> float | None:
        return None if self.price_per_gpu_hour is None else self.gpu_hours * self.price_per_gpu_hour

    @property
    def tokens_per_second_per_gpu(self) -> float:
        return self.peak_flops * self.mfu / self.flops_per_token


def _peak(acc: Accelerator, dtype: str, peak_tflops: float | None) -> tuple[float, str]:
    if peak_tflops is not None:
        return peak_tflops * 1e12, f"{peak_tflops:g} TFLOP/s (given)"
    return acc.peak_flops(dtype), f"{acc.name} dense {dtype} {acc.dense_tflops[dtype]:g} TFLOP/s"


def _check_mfu(mfu: float) -> None:
    if not 0 < mfu <= 1:
        raise BudgetError(f"MFU must be in (0, 1] (got {mfu}); typical dense training is 0.3-0.45")


def gpu_days_for_tokens(
    tokens: float,
    flops_per_token: float,
    acc: Accelerator,
    mfu: float,
    gpus: int | None = None,
    days: float | None = None,
    price_per_gpu_hour: float | None = None,
    dtype: str = "bf16",
    peak_tflops: float | None = None,
) -> ComputePlan:
    """How long `tokens` take on `gpus`, or how many GPUs finish them in `days` (give one)."""
    _check_mfu(mfu)
    if (gpus is None) == (days is None):
        raise BudgetError("give exactly one of a GPU count or a number of days")
    peak, source = _peak(acc, dtype, peak_tflops)
    gpu_seconds = tokens * flops_per_token / (peak * mfu)
    if gpus is not None:
        if gpus < 1:
            raise BudgetError(f"GPU count must be >= 1 (got {gpus})")
        days = gpu_seconds / gpus / SECONDS_PER_DAY
    else:
        assert days is not None
        if days <= 0:
            raise BudgetError(f"days must be > 0 (got {days})")
        gpus = max(1, -(-int(gpu_seconds) // int(days * SECONDS_PER_DAY)))  # ceil
        days = gpu_seconds / gpus / SECONDS_PER_DAY
    return ComputePlan(
        tokens, flops_per_token, acc.name, peak, source, mfu, gpus, days, price_per_gpu_hour
    )


def tokens_for_budget(
    flops_per_token: float,
    acc: Accelerator,
    mfu: float,
    gpu_hours: float | None = None,
    cost: float | None = None,
    price_per_gpu_hour: float | None = None,
    dtype: str = "bf16",
    peak_tflops: float | None = None,
) -> float:
    """Tokens a budget buys: give GPU-hours, or a cost with a price per GPU-hour."""
    _check_mfu(mfu)
    if gpu_hours is None:
        if cost is None or not price_per_gpu_hour:
            raise BudgetError("give GPU-hours, or a cost together with a price per GPU-hour")
        gpu_hours = cost / price_per_gpu_hour
    if gpu_hours <= 0:
        raise BudgetError(f"the budget must be positive (got {gpu_hours} GPU-hours)")
    peak, _ = _peak(acc, dtype, peak_tflops)
    return gpu_hours * 3600 * peak * mfu / flops_per_token


def reserve_for_experiments(
    gpu_hours: float, share: float = SMOLLM3_EXPERIMENT_SHARE
) -> tuple[float, float]:
    """Split a budget into (main run, ablations + debugging); the default share is SmolLM3's."""
    if not 0 <= share < 1:
        raise BudgetError(f"the reserved share must be in [0, 1) (got {share})")
    return gpu_hours * (1 - share), gpu_hours * share


def tokens_per_parameter(tokens: float, params: float) -> float:
    return tokens / params
