"""The SFT loss: summed cross-entropy over supervised targets, divided by a token count.

Per micro-batch ``sft_loss(model, batch)`` is the mean over its supervised targets, which is
TRL's ``per_token_loss.sum() / num_tokens`` on the same batch. With gradient accumulation, pass
``normalizer=batch.step_supervised / world_size``: the micro-batch losses then add up to the mean
over every supervised target of the optimizer step (DDP averages gradients over ranks), so each
token weighs the same however the step is split, as TRL does with ``num_items_in_batch``.
"""

from __future__ import annotations

from torch import Tensor, nn

from crucible.config import ConfigError
from crucible.data.loader import Batch
from crucible.model.loss import IGNORE_INDEX


def _config(model: nn.Module):  # type: ignore[no-untyped-def]
    m = model
    while not hasattr(m, "cfg"):
        inner = getattr(m, "_orig_mod", None) or getattr(m, "module", None)
        if inner is None:
            raise TypeError(f"expected a crucible Transformer, got {type(model).__name__}")
        m = inner
    return m.cfg


def sft_loss(model: nn.Module, batch: Batch, *, normalizer: float | None = None) -> Tensor:
    """Sum of cross-entropy over the supervised targets of `batch`, over `normalizer`.

    normalizer defaults to the batch's own number of supervised targets (a mean). A batch without
    supervised targets is a ConfigError naming its records; so is a packed batch on a model
    without ``doc_masking`` (its examples would attend to each other).
    """
    n = int((batch.targets != IGNORE_INDEX).sum())
    records = getattr(batch, "records", ())
    if n == 0:
        shown = ", ".join([x for row in records for x in row][:5]) or "unknown"
        raise ConfigError(f"a batch has no supervised tokens (records: {shown})")
    if getattr(batch, "packed", False) and not _config(model).doc_masking:
        raise ConfigError(
            "packed SFT batches need model.doc_masking=true, or packed examples attend to each "
            "other; set it (it changes no weights) or use packing: false"
        )
    out = model(batch.tokens, batch.targets, doc_ids=batch.doc_ids, reduction="sum")
    return out.loss / (normalizer if normalizer is not None else n)
