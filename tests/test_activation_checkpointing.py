"""Activation checkpointing against the planner: the memory a forward pass leaves for backward,
measured on CPU under bf16 autocast, is within 5% of `crucible.plan.memory`'s prediction for
every mode the trainer runs, and recomputation does not change the gradients.

The measurement tracks every storage the forward pass creates (a dispatch mode with weak
references) and counts those still alive once the loss is returned: what autograd saved (its
saved-tensor hooks see these) plus what a non-reentrant checkpoint keeps for its recompute (the
region's inputs, which autograd's hooks do not see). Activations are told from weights' bf16
copies by shape: activations lead with batch x sequence.
"""

import gc

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from crucible.config import load_config
from crucible.model import Transformer
from crucible.model.loss import default_chunk_rows
from crucible.plan.memory import Layout, activations, estimate_memory
from crucible.train.activation_checkpointing import apply_activation_checkpointing

BATCH, SEQ = 2, 256


class _Track(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.refs: dict[int, tuple[StorageWeakRef, tuple, torch.dtype, int]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                s = t.untyped_storage()
                self.refs[s._cdata] = (StorageWeakRef(s), tuple(t.shape), t.dtype, s.nbytes())
        return out


def _is_activation(shape: tuple) -> bool:
    return (
        shape[:2] == (BATCH, SEQ)
        or (bool(shape) and shape[0] == BATCH * SEQ)
        or (len(shape) == 4 and shape[0] == BATCH and shape[2] == SEQ)
    )


def _kept_after_forward(cfg, mode: str, every: int) -> tuple[int, int]:
    """(activation bytes, bf16 weight-copy bytes) alive after the forward pass."""
    torch.manual_seed(0)
    model = Transformer(cfg)
    apply_activation_checkpointing(model, mode, every)
    # Linear layers save their weight's cast as the transposed view.
    weight_shapes = {s for p in model.parameters() if p.ndim == 2 for s in (p.shape, p.T.shape)}
    x = torch.randint(0, cfg.vocab_size, (BATCH, SEQ))
    track = _Track()
    # The planner models the loss head's default chunking (one chunk here); on CPU the loss
    # uses 256-row chunks (crucible.model.loss.default_chunk_rows), which keep ~0.5 MB less.
    model.loss_chunk_rows = default_chunk_rows(cfg.vocab_size)
    with track, torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, targets=x)
    gc.collect()
    acts = copies = 0
    for ref, shape, dtype, nbytes in track.refs.values():
        if ref.expired():
            continue
        if _is_activation(shape):
            acts += nbytes
        elif dtype == torch.bfloat16 and shape in weight_shapes:
            copies += nbytes
    del out
    return acts, copies


@pytest.mark.parametrize(
    "mode, every", [("none", 1), ("selective", 1), ("full", 1), ("full", 2), ("selective", 2)]
)
def test_kept_activations_match_the_planner(mode, every):
    cfg = load_config("tiny", ["model.vocab_size=1000"]).model
    acts, copies = _kept_after_forward(cfg, mode, every)
    layout = Layout(micro_batch=BATCH, seq_len=SEQ, recompute=mode, recompute_every=every)
    predicted = activations(cfg, layout, "autocast").kept_after_forward
    assert abs(predicted - acts) / acts < 0.05, (mode, every, predicted, acts)
    # The weights' bf16 copies kept for backward (the output head's is made in chunks, not kept).
    est = estimate_memory(cfg, layout, "autocast")
    head = 2 * cfg.vocab_size * cfg.hidden_size
    assert est.autocast_copies - head == pytest.approx(copies, rel=0.05), (mode, copies)


def test_modes_order_and_gradients_are_unchanged():
    cfg = load_config("tiny", ["model.vocab_size=1000"]).model
    kept = {m: _kept_after_forward(cfg, m, 1)[0] for m in ("none", "selective", "full")}
    assert kept["full"] < kept["selective"] < kept["none"]
    x = torch.randint(0, cfg.vocab_size, (2, 64), generator=torch.Generator().manual_seed(1))
    grads = {}
    for mode in ("none", "selective", "full"):
        torch.manual_seed(0)
        model = Transformer(cfg)
        apply_activation_checkpointing(model, mode)
        model(x, targets=x).loss.backward()
        grads[mode] = {n.replace("_checkpoint_wrapped_module.", ""): p.grad
                       for n, p in model.named_parameters()}  # fmt: skip
        assert list(grads[mode]) == [n for n, _ in Transformer(cfg).named_parameters()]
    for mode in ("selective", "full"):
        for n, g in grads["none"].items():
            assert torch.equal(g, grads[mode][n]), (mode, n)
