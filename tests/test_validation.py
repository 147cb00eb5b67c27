"""Bits-per-byte against a hand computation."""

import math

import torch

from crucible.data.loader import Batch
from crucible.train.validation import evaluate_loss


class ConstantLoss(torch.nn.Module):
    """Stands in for the model: every token costs `nats` nats."""

    def __init__(self, nats: float):
        super().__init__()
        self.nats = nats

    def forward(self, tokens, targets, doc_ids=None, reduction="none"):
        return type("Out", (), {"loss": torch.full(targets.shape, self.nats)})()


def test_bits_per_byte_by_hand():
    # token 0 is a special token (0 bytes); tokens 1, 2, 3 decode to 1, 2 and 3 bytes.
    token_bytes = torch.tensor([0, 1, 2, 3])
    targets = torch.tensor([[1, 2, 0, 3], [3, 3, 1, 0]])
    batch = Batch(tokens=targets.clone(), targets=targets, doc_ids=torch.zeros_like(targets))
    out = evaluate_loss(ConstantLoss(0.7), [batch], token_bytes, torch.device("cpu"), None)
    text_tokens, text_bytes = 6, 1 + 2 + 3 + 3 + 3 + 1
    assert math.isclose(out["val_loss"], 0.7, rel_tol=1e-6)
    assert math.isclose(
        out["val_bpb"], 0.7 * text_tokens / (math.log(2) * text_bytes), rel_tol=1e-6
    )
    assert out["val_tokens"] == 8
