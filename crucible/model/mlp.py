"""SwiGLU feed-forward block."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from crucible.model.autocast import autocast_input


class MLP(nn.Module):
    """down(silu(gate(x)) * up(x)), with Llama's parameter names and no biases."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        x = autocast_input(x)  # gate and up read it: one cast, not two
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
