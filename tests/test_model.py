"""The crucible transformer: shapes, attention variants, fused loss, masking, cache, meta init."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from crucible.config import ModelConfig
from crucible.model import ModelOutput, Transformer
from crucible.model.attention import dense_doc_mask, positions_from_doc_ids

BASE = dict(
    vocab_size=97,
    hidden_size=64,
    num_layers=3,
    num_heads=4,
    num_kv_heads=2,
    intermediate_size=96,
    max_seq_len=48,
)


def make(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**{**BASE, **overrides}))


def ids(B: int, T: int, seed: int = 1, vocab: int = BASE["vocab_size"]) -> torch.Tensor:
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_shapes_and_attention_variants(kv_heads: int) -> None:
    model = make(num_kv_heads=kv_heads)
    out = model(ids(2, 16))
    assert isinstance(out, ModelOutput)
    assert out.logits.shape == (2, 16, BASE["vocab_size"]) and out.logits.dtype == torch.float32
    assert out.loss is None and out.z_loss is None
    assert torch.isfinite(out.logits).all()
    k = model.layers[0].self_attn.k_proj.weight
    assert k.shape == (kv_heads * 16, 64)


def test_variants_run_and_have_expected_parameters() -> None:
    model = make(
        qk_norm=True, attention_bias=True, nope_interval=2, head_dim=32, tie_embeddings=False
    )
    attn = model.layers[1].self_attn
    assert attn.q_norm is not None and attn.q_proj.bias is not None and not attn.use_rope
    assert model.layers[0].self_attn.use_rope and model.lm_head is not None
    assert attn.q_proj.weight.shape == (4 * 32, 64)
    assert model(ids(2, 8)).logits.shape == (2, 8, BASE["vocab_size"])
    tied = make()
    assert tied.lm_head is None and "lm_head.weight" not in tied.state_dict()


def test_init_statistics() -> None:
    model = make(vocab_size=2000, hidden_size=128, intermediate_size=256, attention_bias=True)
    assert model.embed.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.layers[0].mlp.up_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert (model.layers[0].self_attn.q_proj.bias == 0).all()
    assert (model.layers[0].input_layernorm.weight == 1).all() and (model.norm.weight == 1).all()


# --------------------------------------------------------------------------- loss


def reference_loss(model: Transformer, x, y, reduction: str, z_coef: float):
    logits = model(x).logits
    flat, t = logits.flatten(0, 1), y.flatten()
    ce = F.cross_entropy(flat, t, reduction="none")
    valid = t != -100
    lse2 = flat.logsumexp(-1).square() * valid
    z = lse2.sum() / valid.sum()
    if reduction == "none":
        return ce.view_as(y), z
    if reduction == "sum":
        return ce.sum() + z_coef * lse2.sum(), z
    return ce.sum() / valid.sum() + z_coef * z, z


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("z_coef", [0.0, 1e-2])
@pytest.mark.parametrize("tied", [True, False])
def test_chunked_ce_matches_full_logits(reduction: str, z_coef: float, tied: bool) -> None:
    model = make(z_loss=z_coef, tie_embeddings=tied)
    model.loss_chunk_rows = 7  # does not divide the 2 x 20 tokens: exercises a ragged chunk
    x = ids(2, 20)
    y = ids(2, 20, seed=2)
    y[0, :5] = -100
    y[1, -1] = -100
    weights = torch.rand(2, 20, generator=torch.Generator().manual_seed(3))

    def run(fn):
        model.zero_grad()
        loss, z = fn()
        (loss * weights).sum().backward() if reduction == "none" else loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        return loss.detach(), z.detach(), grads

    def ours():
        out = model(x, y, reduction=reduction)
        assert out.logits is None
        return out.loss, out.z_loss

    loss, z, grads = run(ours)
    ref_loss, ref_z, ref_grads = run(lambda: reference_loss(model, x, y, reduction, z_coef))
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(z, ref_z, rtol=1e-5, atol=1e-5)
    if reduction == "none":
        assert (loss[y == -100] == 0).all()
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    with torch.no_grad():  # the evaluation path (no autograd) gives the same numbers
        out = model(x, y, reduction=reduction)
    torch.testing.assert_close(out.loss, ref_loss, rtol=1e-5, atol=1e-5)


def test_loss_with_everything_ignored_is_zero() -> None:
    model = make()
    y = torch.full((1, 8), -100)
    out = model(ids(1, 8), y)
    assert out.loss.item() == 0.0
    out.loss.backward()


# --------------------------------------------------------------------------- masking


@pytest.mark.parametrize("nope", [0, 2])
def test_causal(nope: int) -> None:
    model = make(nope_interval=nope)
    x = ids(2, 16)
    x2 = x.clone()
    x2[:, 10] = (x2[:, 10] + 1) % BASE["vocab_size"]
    a, b = model(x).logits, model(x2).logits
    torch.testing.assert_close(a[:, :10], b[:, :10], rtol=0, atol=0)
    assert (a[:, 10:] - b[:, 10:]).abs().max() > 1e-4


def test_positions_and_dense_mask_from_doc_ids() -> None:
    doc = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2]])
    assert positions_from_doc_ids(doc).tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]
    mask = dense_doc_mask(doc)[0, 0]
    assert mask[4].tolist() == [False, False, False, True, True, False, False, False, False]
    assert mask.diagonal().all()


@pytest.mark.parametrize("overrides", [{}, {"nope_interval": 2, "qk_norm": True}])
def test_doc_masking_isolates_documents(overrides: dict) -> None:
    model = make(doc_masking=True, **overrides)
    a, b = ids(2, 7, seed=4), ids(2, 9, seed=5)
    a2 = ids(2, 7, seed=6)
    doc_ids = torch.tensor([[0] * 7 + [1] * 9, [3] * 7 + [8] * 9])
    packed = model(torch.cat([a, b], 1), doc_ids=doc_ids).logits
    packed2 = model(torch.cat([a2, b], 1), doc_ids=doc_ids).logits
    alone_a, alone_b = model(a).logits, model(b).logits
    torch.testing.assert_close(packed[:, 7:], packed2[:, 7:], rtol=0, atol=1e-6)
    torch.testing.assert_close(packed[:, 7:], alone_b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed[:, :7], alone_a, rtol=1e-5, atol=1e-5)
    # The loss path uses the same mask.
    y = torch.cat([a, b], 1).roll(-1, 1)
    loss_doc = model(torch.cat([a, b], 1), y, doc_ids=doc_ids, reduction="none").loss
    loss_b = model(b, y[:, 7:], reduction="none").loss
    torch.testing.assert_close(loss_doc[:, 7:], loss_b, rtol=1e-5, atol=1e-5)


def test_doc_ids_ignored_without_doc_masking() -> None:
    model = make(doc_masking=False)
    x = ids(1, 12)
    doc_ids = torch.tensor([[0] * 6 + [1] * 6])
    torch.testing.assert_close(model(x, doc_ids=doc_ids).logits, model(x).logits, rtol=0, atol=0)


# --------------------------------------------------------------------------- construction


def test_meta_device_construction() -> None:
    cfg = ModelConfig(**BASE, qk_norm=True, tie_embeddings=False)
    with torch.device("meta"):
        model = Transformer(cfg)
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    torch.manual_seed(0)
    eager = Transformer(cfg)
    for (n, p), q in zip(model.state_dict().items(), eager.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=n)
    torch.testing.assert_close(model.rope.inv_freq, eager.rope.inv_freq, rtol=0, atol=0)
    x = ids(1, 8)
    torch.testing.assert_close(model(x).logits, eager(x).logits, rtol=0, atol=0)


def test_input_validation() -> None:
    model = make()
    with pytest.raises(ValueError, match="max_seq_len"):
        model(ids(1, BASE["max_seq_len"] + 1))
    bad = ids(1, 4)
    bad[0, 2] = BASE["vocab_size"]
    with pytest.raises(ValueError, match="vocab"):
        model(bad)


PARAM_CONFIGS = [
    {},
    {"tie_embeddings": False},
    {"num_kv_heads": 1, "qk_norm": True},
    {"head_dim": 24, "num_heads": 6, "num_kv_heads": 3, "nope_interval": 2},
    {"attention_bias": True, "tie_embeddings": False},
]


@pytest.mark.parametrize("overrides", PARAM_CONFIGS)
def test_num_params_matches_plan(overrides: dict) -> None:
    from crucible.plan.params import count_params

    cfg = ModelConfig(**{**BASE, **overrides})
    with torch.device("meta"):
        model = Transformer(cfg)
    assert model.num_params() == sum(p.numel() for p in model.parameters())
    assert count_params(cfg).total == model.num_params()


# --------------------------------------------------------------------------- KV cache


@pytest.mark.parametrize(
    "overrides", [{}, {"num_kv_heads": 1, "nope_interval": 2, "qk_norm": True}]
)
def test_kv_cache_matches_full_forward(overrides: dict) -> None:
    model = make(**overrides)
    x = ids(2, 20)
    full = model(x).logits
    cache = model.new_cache(batch_size=2, max_len=20)
    steps = [model(x[:, :8], cache=cache).logits]  # prefill
    steps.append(model(x[:, 8:12], cache=cache).logits)  # a chunk on top of a cache
    steps += [model(x[:, t : t + 1], cache=cache).logits for t in range(12, 20)]
    assert cache.length == 20
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError):
        model(x[:, :1], cache=cache)  # the cache is full


@pytest.mark.parametrize("extra", [{}, {"linear_attention": {"pattern": ["linear", "full"]}}])
def test_zero_init_residual_makes_every_block_the_identity(extra):
    if extra:
        extra = {**extra, "num_layers": 4}
    model = make(zero_init_residual=True, **extra)
    plain = make(**extra)
    x = ids(2, 16)
    with torch.no_grad():
        # Each block adds zero to the residual stream: logits = head(final_norm(embedding)).
        expected = F.linear(model.norm(model.embed(x)), model.embed.weight)
        torch.testing.assert_close(model(x).logits, expected)
    zeroed = {n for n, p in model.named_parameters() if not p.any()}
    assert zeroed and all(n.endswith(("o_proj.weight", "out_proj.weight", "down_proj.weight"))
                          for n in zeroed)  # fmt: skip
    # Everything else is drawn exactly as without the option.
    for (n, p), (_, q) in zip(model.named_parameters(), plain.named_parameters(), strict=True):
        if n not in zeroed:
            assert torch.equal(p, q), n
    # It trains: output projections get gradients at once, the rest from the second step.
    model(x, targets=x).loss.backward()
    assert all(model.get_parameter(n).grad.abs().sum() > 0 for n in zeroed)
