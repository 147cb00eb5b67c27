"""The optimizer: AdamW with the usual weight-decay exclusions, or Muon + AdamW."""

from __future__ import annotations

import torch
from torch import nn

from crucible.config import OptimConfig


def _embedding_ids(model: nn.Module) -> set[int]:
    return {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}


def _output_ids(model: nn.Module) -> set[int]:
    return {
        id(m.weight)
        for name, m in model.named_modules()
        if name.rsplit(".", 1)[-1] == "lm_head" and isinstance(m, nn.Linear)
    }


def muon_params(model: nn.Module) -> list[nn.Parameter]:
    """The hidden matrices Muon updates: every 2-D parameter but the embedding and output head."""
    excluded = _embedding_ids(model) | _output_ids(model)
    return [
        p for p in model.parameters() if p.requires_grad and p.ndim == 2 and id(p) not in excluded
    ]


def param_groups(model: nn.Module, cfg: OptimConfig, exclude: set[int] | None = None) -> list[dict]:
    """Split parameters (except those in `exclude`) into decayed and non-decayed groups.

    Norm weights and biases (every 1-D parameter) never decay: shrinking a gain or an offset towards 0
    is not regularisation. Embeddings decay unless `decay_embeddings` is off (SmolLM3 turns it off).
    """
    embedding_ids = _embedding_ids(model)
    exclude = exclude or set()
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad or id(p) in exclude:
            continue
        if p.ndim < 2 or (id(p) in embedding_ids and not cfg.decay_embeddings):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}] if decay else []
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(
    model: nn.Module, cfg: OptimConfig, device: torch.device
) -> torch.optim.Optimizer:
    fused = cfg.fused if cfg.fused is not None else device.type == "cuda"
    adamw_kwargs = dict(lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused or None)
    if cfg.name == "adamw":
        return torch.optim.AdamW(param_groups(model, cfg), **adamw_kwargs)

    from crucible.train.muon import MuonWithAdamW

    hidden = muon_params(model)
    muon_cfg = cfg.muon
    muon_group = {
        "params": hidden,
        # The trainer writes the scheduled AdamW LR into every group; Muon follows at this ratio.
        "lr_scale": (muon_cfg.lr or cfg.lr) / cfg.lr,
        "weight_decay": cfg.weight_decay
        if muon_cfg.weight_decay is None
        else muon_cfg.weight_decay,
    }
    muon_kwargs = dict(
        lr=cfg.lr,
        momentum=muon_cfg.momentum,
        nesterov=muon_cfg.nesterov,
        ns_steps=muon_cfg.ns_steps,
        adjust_lr_fn=muon_cfg.adjust_lr,
    )
    rest = param_groups(model, cfg, exclude={id(p) for p in hidden})
    return MuonWithAdamW([muon_group], rest, muon_kwargs, adamw_kwargs)
