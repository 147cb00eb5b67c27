"""The dtype autocast would compute a matmul in, for code that casts once by hand."""

from __future__ import annotations

import torch
from torch import Tensor


def active_autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype on `device_type`, or None when autocast is off there."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def autocast_input(x: Tensor) -> Tensor:
    """Cast an input read by several projections to the autocast dtype once, for all of them.

    Autocast casts activations per op, so q/k/v (and gate/up) would each make their own bf16 copy
    of the same fp32 tensor, and backward would cast each gradient back: 4 of the 13 copies per
    layer in a CPU profile. The values are identical; only the sum of the projections' gradients
    runs in bf16 instead of fp32. Modules that need the fp32 input (the MoE router) do not call it.
    """
    dtype = active_autocast_dtype(x.device.type)
    return x if dtype is None else x.to(dtype)
