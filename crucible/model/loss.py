"""Cross-entropy from final hidden states without materialising the full [N, V] logits.

For large vocabularies the fp32 logits of a micro-batch dwarf everything else (3 x 4096 tokens x
128k vocab x 4 bytes = 6 GiB, plus as much again for their gradient). Both paths below work on
chunks of rows so that only one chunk of logits exists at a time:

* training under torch.compile when all rows fit in one chunk: plain autograd, which the
  compiler fuses (no extra memory: one chunk is all the rows).
* training (mean/sum reduction, gradients needed) over several chunks: a custom autograd function computes the
  gradients of the summed loss with respect to the hidden states and the output weight while it
  has each chunk's logits at hand, and scales them by the incoming gradient in backward. This
  costs the same three matmuls as an ordinary lm_head + cross-entropy, with no recomputation.
* per-token losses with gradients: each chunk is wrapped in activation checkpointing, so its
  logits are recomputed in backward instead of kept.
* no gradients (evaluation): a plain loop.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from crucible.model.autocast import active_autocast_dtype

IGNORE_INDEX = -100


# On CPU, vocabularies up to this size use CPU_SMALL_VOCAB_ROWS rows per chunk.
CPU_SMALL_VOCAB = 32768
CPU_SMALL_VOCAB_ROWS = 256


def default_chunk_rows(vocab_size: int, device_type: str = "cuda") -> int:
    """About 2^28 logits (1 GiB in fp32) per chunk, in whole multiples of 256 rows.

    Few, large chunks matter: every chunk adds a [V, D] product into the fp32 weight gradient,
    and tile-aligned row counts keep the matmuls at full speed.

    On CPU with a small vocabulary the elementwise passes over each chunk's logits (softmax,
    gradient) cost more than the matmuls, and they run about twice as fast when the chunk
    (256 rows x V <= 32768) stays in cache, while the extra [V, D] additions are small. Measured
    on 1 and 2 threads (docs/benchmarks.md, "CPU speedrun").
    """
    if device_type == "cpu" and vocab_size <= CPU_SMALL_VOCAB:
        return CPU_SMALL_VOCAB_ROWS
    return max(256, min(16384, ((1 << 28) // vocab_size) // 256 * 256))


def _chunk_stats(h: Tensor, w: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """fp32 logits, their logsumexp and the per-token CE (0 where ignored) for one chunk."""
    logits = F.linear(h, w).float()
    lse = torch.logsumexp(logits, dim=-1)
    valid = targets != IGNORE_INDEX
    target_logit = logits.gather(1, targets.clamp(min=0)[:, None]).squeeze(1)
    ce = torch.where(valid, lse - target_logit, 0.0)
    return logits, lse, ce


def _ce_lse(h: Tensor, w: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    _, lse, ce = _chunk_stats(h, w, targets)
    return ce, torch.where(targets != IGNORE_INDEX, lse, 0.0)


def _matmul_dtype(w: Tensor) -> torch.dtype:
    return active_autocast_dtype(w.device.type) or w.dtype


class _SummedLinearCrossEntropy(torch.autograd.Function):
    """sum over tokens of CE + z_coef * logsumexp^2, from hidden states h [N, D] and W [V, D].

    Returns (objective, ce_sum, z_sum); only the objective is differentiable.
    """

    @staticmethod
    def forward(ctx, h: Tensor, w: Tensor, targets: Tensor, z_coef: float, chunk: int):  # type: ignore[override]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # Cast once up front (autocast would otherwise re-cast W for every chunk's matmuls).
        mm_dtype = _matmul_dtype(w)
        w_mm = w.to(mm_dtype)
        grad_h = torch.zeros_like(h, dtype=torch.float32) if need_h else None
        grad_w = torch.zeros_like(w, dtype=torch.float32) if need_w else None
        ce_sum = h.new_zeros((), dtype=torch.float32)
        z_sum = h.new_zeros((), dtype=torch.float32)
        for start in range(0, h.shape[0], chunk):
            hc, tc = h[start : start + chunk].to(mm_dtype), targets[start : start + chunk]
            logits, lse, ce = _chunk_stats(hc, w_mm, tc)
            valid = (tc != IGNORE_INDEX).float()
            ce_sum += ce.sum()
            z_sum += (lse.square() * valid).sum()
            # d/dlogits [ce + z * lse^2] = softmax * (1 + 2 z lse) - onehot(target); 0 if ignored.
            g = logits.sub_(lse[:, None]).exp_()
            g.mul_(((1.0 + 2.0 * z_coef * lse) * valid)[:, None])
            g.scatter_add_(1, tc.clamp(min=0)[:, None], -valid[:, None])
            g = g.to(mm_dtype)
            if grad_h is not None:
                grad_h[start : start + chunk] = g @ w_mm
            if grad_w is not None:
                grad_w += g.t() @ hc
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = (h.dtype, w.dtype)
        ctx.mark_non_differentiable(ce_sum, z_sum)
        return ce_sum + z_coef * z_sum, ce_sum, z_sum

    @staticmethod
    def backward(ctx, grad_out: Tensor, *_unused: Tensor):  # type: ignore[override]
        grad_h, grad_w = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        gh = (grad_h * grad_out).to(h_dtype) if grad_h is not None else None
        gw = (grad_w * grad_out).to(w_dtype) if grad_w is not None else None
        return gh, gw, None, None, None


def linear_cross_entropy(
    h: Tensor,
    w: Tensor,
    targets: Tensor,
    *,
    reduction: str = "mean",
    z_coef: float = 0.0,
    chunk_rows: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Cross-entropy of logits h @ w.T against targets, computed chunk by chunk.

    h: [N, D] hidden states, w: [V, D] output weight, targets: [N] with -100 = ignore.
    Returns (loss, z_loss) where z_loss = mean over non-ignored tokens of logsumexp(logits)^2.
    reduction "mean": mean CE over non-ignored tokens + z_coef * z_loss (0 if none are kept);
    "sum": sum over tokens of CE + z_coef * logsumexp^2; "none": per-token CE [N], 0 where
    ignored, without the z term. In the fused training path z_loss is detached (for logging).
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    chunk = chunk_rows or default_chunk_rows(w.shape[0], w.device.type)
    # Compiled code fuses the elementwise passes itself: the small CPU chunks are for eager mode.
    one_chunk = h.shape[0] <= (chunk_rows or default_chunk_rows(w.shape[0]))
    n_valid = (targets != IGNORE_INDEX).sum().clamp(min=1).float()
    needs_grad = torch.is_grad_enabled() and (h.requires_grad or w.requires_grad)

    if needs_grad and reduction != "none" and one_chunk and torch.compiler.is_compiling():
        # Under torch.compile, with every row in one chunk: plain autograd keeps no more than a
        # chunk would, and the compiler fuses it with the model (the custom Function would not).
        # Eager mode keeps the Function: computing the gradient in the forward pass is faster.
        _, lse, ce = _chunk_stats(h, w, targets)
        z_sum = torch.where(targets != IGNORE_INDEX, lse.square(), 0.0).sum()
        total = ce.sum() + z_coef * z_sum
        z_loss = z_sum.detach() / n_valid
        return (total / n_valid if reduction == "mean" else total), z_loss
    if needs_grad and reduction != "none":
        total, _ce, z_sum = _SummedLinearCrossEntropy.apply(h, w, targets, z_coef, chunk)
        z_loss = z_sum / n_valid
        return (total / n_valid if reduction == "mean" else total), z_loss

    ces, lses = [], []
    for start in range(0, h.shape[0], chunk):
        args = (h[start : start + chunk], w, targets[start : start + chunk])
        ce, lse = checkpoint(_ce_lse, *args, use_reentrant=False) if needs_grad else _ce_lse(*args)
        ces.append(ce)
        lses.append(lse)
    ce, lse = torch.cat(ces), torch.cat(lses)
    z_sq = lse.square()  # already 0 at ignored tokens
    z_loss = z_sq.sum() / n_valid
    if reduction == "none":
        return ce, z_loss
    if reduction == "sum":
        return ce.sum() + z_coef * z_sq.sum(), z_loss
    return ce.sum() / n_valid + z_coef * z_loss, z_loss
