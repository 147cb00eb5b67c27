"""Muon for the hidden matrices, AdamW for everything else, as one torch optimizer.

`Muon` is `torch.optim.Muon` with two additions, and otherwise the same update, op for op
(momentum, Nesterov, Newton-Schulz orthogonalisation in bf16, learning-rate adjustment by shape,
decoupled weight decay):

* FSDP2 shards each matrix by rows, and orthogonalisation needs the whole matrix. For a DTensor
  parameter the momentum stays sharded (an elementwise update), the update matrix is gathered
  (`full_tensor()`, one all-gather), every rank orthogonalises the same full matrix, and each
  keeps its own rows of the result. The learning-rate adjustment uses the global shape.
* `lr_scale` in a param group multiplies the group's `lr`: the trainer writes one scheduled LR
  (the AdamW one) into every group, and Muon groups follow it at `muon.lr / optim.lr`.

`MuonWithAdamW` holds a `Muon` and an `AdamW` that share their param-group dicts and one state
dict with it, so the trainer, the LR schedule, checkpoints (`state_dict` / `load_state_dict`) and
`torch.distributed.checkpoint` see one ordinary optimizer.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.optim._muon import _adjust_lr, _zeropower_via_newtonschulz

try:
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # pragma: no cover - builds without torch.distributed
    DTensor = None  # type: ignore[assignment,misc]


def _orthogonalise(update: torch.Tensor, group: dict[str, Any]) -> torch.Tensor:
    args = (group["ns_coefficients"], group["ns_steps"], group["eps"])
    if DTensor is not None and isinstance(update, DTensor):
        full = _zeropower_via_newtonschulz(update.full_tensor(), *args)
        # Every rank holds the same full result: keep the local shard, no communication.
        return distribute_tensor(full, update.device_mesh, update.placements, src_data_rank=None)
    return _zeropower_via_newtonschulz(update, *args)


class Muon(torch.optim.Muon):
    """torch.optim.Muon that also steps FSDP2-sharded matrices and honours `lr_scale`."""

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr = group["lr"] * group.get("lr_scale", 1.0)
            wd, momentum = group["weight_decay"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(grad)
                buf = state["momentum_buffer"]
                buf.lerp_(grad, 1 - momentum)
                update = grad.lerp(buf, momentum) if group["nesterov"] else buf
                update = _orthogonalise(update, group)
                p.mul_(1 - lr * wd)
                p.add_(update, alpha=-_adjust_lr(lr, group["adjust_lr_fn"], p.shape))
        return loss


class MuonWithAdamW(torch.optim.Optimizer):
    """One optimizer over Muon groups (2-D hidden matrices) and AdamW groups (the rest)."""

    def __init__(
        self,
        muon_groups: list[dict[str, Any]],
        adamw_groups: list[dict[str, Any]],
        muon_kwargs: dict[str, Any],
        adamw_kwargs: dict[str, Any],
    ) -> None:
        self.muon = Muon(muon_groups, **muon_kwargs)
        self.adamw = torch.optim.AdamW(adamw_groups, **adamw_kwargs)
        super().__init__([*self.muon.param_groups, *self.adamw.param_groups], defaults={})
        self._link()

    def _link(self) -> None:
        """Point both inner optimizers at this optimizer's group dicts and state."""
        n = len(self.muon.param_groups)
        self.muon.param_groups = self.param_groups[:n]
        self.adamw.param_groups = self.param_groups[n:]
        self.muon.state = self.adamw.state = self.state

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.muon.step()
        self.adamw.step()
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)  # replaces self.state and the group dicts
        self._link()
