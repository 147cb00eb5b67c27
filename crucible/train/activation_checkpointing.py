"""Activation checkpointing: trade recomputation in backward for activation memory.

- full: a block keeps only its input; backward re-runs the whole block first
  (`checkpoint_wrapper`, non-reentrant; state-dict names are unchanged).
- selective: the SwiGLU tail `down(silu(gate) * up)` is recomputed from the kept gate and up
  outputs, so silu(gate) and the product (two [tokens, intermediate] tensors, the largest a block
  saves) are not kept; the rest of the block saves as usual. About 2% more FLOPs.

`every` applies the mode to blocks 0, N, 2N, ...; the planner (`crucible.plan.memory`) models the
same choices, and tests/test_activation_checkpointing.py checks it against autograd.
"""

from __future__ import annotations

import functools

import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

MODES = ("none", "full", "selective")


def checkpointed_blocks(num_layers: int, every: int) -> list[int]:
    return [i for i in range(num_layers) if i % every == 0]


def _swiglu_tail(mlp: nn.Module, gate: Tensor, up: Tensor) -> Tensor:
    return mlp.down_proj(F.silu(gate) * up)


def _selective_mlp_forward(mlp: nn.Module, x: Tensor) -> Tensor:
    gate, up = mlp.gate_proj(x), mlp.up_proj(x)
    return checkpoint(_swiglu_tail, mlp, gate, up, use_reentrant=False)


def apply_activation_checkpointing(model: nn.Module, mode: str, every: int = 1) -> None:
    """Checkpoint `model.layers` in place (before FSDP/compile wrap them)."""
    if mode == "none":
        return
    if mode not in MODES:
        raise ValueError(f"activation checkpointing {mode!r}: expected one of {MODES}")
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for i in checkpointed_blocks(len(model.layers), every):
        block = model.layers[i]
        if mode == "full":
            model.layers[i] = checkpoint_wrapper(block, preserve_rng_state=False)
        else:
            block.mlp.forward = functools.partial(_selective_mlp_forward, block.mlp)
