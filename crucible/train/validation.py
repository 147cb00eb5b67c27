"""Held-out loss and bits-per-byte.

Bits-per-byte divides the summed next-token loss (in bits) by the UTF-8 bytes of the predicted
tokens, so models with different tokenizers are comparable: bpb = sum(nats) / (ln 2 * sum(bytes)).
Special tokens (document separators) carry no text bytes; their loss is left out of both sums.
Targets labelled -100 (SFT: prompts and padding) count nowhere: the loss is the mean over the
supervised targets.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
from torch import nn

from crucible.model.loss import IGNORE_INDEX
from crucible.train.distributed import all_reduce_sum


@torch.no_grad()
def evaluate_loss(
    model: nn.Module,
    batches: list,
    token_bytes: torch.Tensor,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
) -> dict[str, float]:
    """Mean token loss and bits-per-byte over `batches` (summed across ranks)."""
    was_training = model.training
    model.eval()
    token_bytes = token_bytes.to(device)
    # Sums stay on the device: one host sync at the end, not one per batch.
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    for batch in batches:
        batch = batch.to(device)
        ctx = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
        with ctx:
            out = model(batch.tokens, batch.targets, doc_ids=batch.doc_ids, reduction="none")
        loss = out.loss.float()
        valid = batch.targets != IGNORE_INDEX
        nbytes = torch.where(valid, token_bytes[batch.targets.clamp(min=0)], 0)
        text = nbytes > 0
        sums += torch.stack(
            [loss.sum(), valid.sum().to(loss.dtype), (loss * text).sum(), nbytes.sum().float()]
        ).double()
    nats, n_tokens, bpb_nats, n_bytes = all_reduce_sum(sums.tolist(), device)
    model.train(was_training)
    return {
        "val_loss": nats / max(n_tokens, 1),
        "val_bpb": bpb_nats / (math.log(2) * max(n_bytes, 1)),
        "val_tokens": int(n_tokens),
    }
