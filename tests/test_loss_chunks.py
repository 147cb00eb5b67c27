"""The chunk size of the fused cross-entropy: small on CPU for small vocabularies only."""

import torch
import torch.nn.functional as F

from crucible.model.loss import default_chunk_rows, linear_cross_entropy


def test_cpu_small_vocab_uses_cache_sized_chunks_and_large_vocab_is_unchanged() -> None:
    assert default_chunk_rows(4096, "cpu") == 256
    assert default_chunk_rows(4096, "cuda") == 16384
    # The published presets' vocabulary gets the same chunks on every device.
    assert default_chunk_rows(128256, "cpu") == default_chunk_rows(128256, "cuda") == 2048


def test_default_cpu_chunks_match_plain_cross_entropy() -> None:
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(600, 32, generator=gen, requires_grad=True)  # 600 rows: 3 chunks, one ragged
    w = (torch.randn(1000, 32, generator=gen) * 0.1).requires_grad_()
    y = torch.randint(0, 1000, (600,), generator=gen)
    y[::7] = -100
    loss, _ = linear_cross_entropy(h, w, y)
    gh, gw = torch.autograd.grad(loss, (h, w))
    ref = F.cross_entropy(F.linear(h, w), y, ignore_index=-100)
    rh, rw = torch.autograd.grad(ref, (h, w))
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(gh, rh)
    torch.testing.assert_close(gw, rw)
