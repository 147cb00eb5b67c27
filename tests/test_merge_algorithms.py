"""Merge formulas: hand-computed small cases (numpy loops written here, independently of
crucible.posttrain.merge) and mergekit's own functions on random tensors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from crucible.posttrain import merge as M

# ---------------------------------------------------------------- independent references (numpy)


def ref_linear(ts, ws, normalize=True):
    out = np.zeros_like(ts[0])
    for idx in np.ndindex(out.shape):
        s = sum(w * t[idx] for t, w in zip(ts, ws))
        out[idx] = s / sum(ws) if normalize else s
    return out


def ref_slerp(t, a, b):
    a_flat, b_flat = a.reshape(-1), b.reshape(-1)
    na = math.sqrt(sum(x * x for x in a_flat))
    nb = math.sqrt(sum(x * x for x in b_flat))
    dot = sum((x / na) * (y / nb) for x, y in zip(a_flat, b_flat))
    dot = max(-1.0, min(1.0, dot))
    if abs(dot) > 0.9995:
        return (1 - t) * a + t * b
    th = math.acos(dot)
    return (math.sin((1 - t) * th) * a + math.sin(t * th) * b) / math.sin(th)


def ref_trim(delta, density):
    """Keep the int(density * n) largest |delta| (at least one)."""
    flat = delta.reshape(-1)
    k = max(1, int(density * flat.size)) if density < 1 else flat.size
    keep = sorted(range(flat.size), key=lambda i: -abs(flat[i]))[:k]
    out = np.zeros_like(flat)
    for i in keep:
        out[i] = flat[i]
    return out.reshape(delta.shape)


def ref_task_family(base, ts, ws, deltas, consensus, normalize, lam=1.0):
    """base + lam * (weighted deltas, with TIES' elected sign and disjoint mean if consensus)."""
    out = np.array(base, dtype=np.float64)
    for idx in np.ndindex(base.shape):
        wd = [w * d[idx] for w, d in zip(ws, deltas)]
        if consensus:
            sign = 1.0 if sum(wd) >= 0 else -1.0
            chosen = [(w, x) for w, x in zip(ws, wd) if np.sign(x) == sign]
            mixed = sum(x for _, x in chosen)
            div = sum(w for w, _ in chosen) or 1.0
        else:
            mixed, div = sum(wd), (sum(ws) if abs(sum(ws)) >= 1e-8 else 1.0)
        out[idx] = base[idx] + lam * (mixed / div if normalize else mixed)
    return out


def _t(x):
    return torch.tensor(x, dtype=torch.float64)


A = np.array([[1.0, -2.0, 3.0], [0.5, 4.0, -1.0]])
B = np.array([[-1.0, 1.0, 2.0], [2.0, -3.0, 0.0]])
BASE = np.array([[0.5, 0.0, 1.0], [1.0, 1.0, -0.5]])


def test_linear_and_soup_hand_computed():
    got = M.linear([_t(A), _t(B)], [0.9, 0.1])
    assert np.allclose(got.numpy(), ref_linear([A, B], [0.9, 0.1]))
    assert np.allclose(got.numpy()[0, 0], 0.9 * 1 + 0.1 * -1)  # one entry by hand: 0.8
    raw = M.linear([_t(A), _t(B)], [2.0, 1.0], normalize=False)
    assert np.allclose(raw.numpy(), 2 * A + B)
    soup = M.linear([_t(A), _t(B), _t(BASE)], [1.0, 1.0, 1.0])
    assert np.allclose(soup.numpy(), (A + B + BASE) / 3)


def test_slerp_hand_computed_and_lerp_fallback():
    for t in (0.0, 0.3, 0.5, 1.0):
        got = M.slerp(t, _t(A), _t(B)).numpy()
        assert np.allclose(got, ref_slerp(t, A, B), atol=1e-12)
    assert np.allclose(M.slerp(0.0, _t(A), _t(B)).numpy(), A)
    assert np.allclose(M.slerp(1.0, _t(A), _t(B)).numpy(), B)
    # orthogonal unit vectors: the midpoint has norm 1 (a lerp would give sqrt(0.5))
    e1, e2 = _t([1.0, 0.0]), _t([0.0, 1.0])
    assert np.allclose(M.slerp(0.5, e1, e2).numpy(), [math.sqrt(0.5)] * 2)
    # (almost) colinear: mergekit's lerp fallback, 2 * A is parallel to A
    assert np.allclose(M.slerp(0.25, _t(A), _t(2 * A)).numpy(), 0.75 * A + 0.25 * 2 * A)


def test_task_arithmetic_hand_computed():
    method = M.Method("task_arithmetic", lam=0.5)
    got = M.task_arithmetic_family(method, _t(BASE), [_t(A), _t(B)], [1.0, 0.5], [1.0, 1.0])
    deltas = [A - BASE, B - BASE]
    want = ref_task_family(BASE, [A, B], [1.0, 0.5], deltas, False, False, lam=0.5)
    assert np.allclose(got.numpy(), want)
    # one entry by hand: 0.5 + 0.5 * (1 * (1 - 0.5) + 0.5 * (-1 - 0.5)) = 0.375
    assert got[0, 0].item() == pytest.approx(0.375)


@pytest.mark.parametrize("density", [1.0, 0.5, 0.34])
def test_ties_hand_computed(density):
    method = M.Method("ties")  # normalize defaults to true, as in mergekit
    got = M.task_arithmetic_family(method, _t(BASE), [_t(A), _t(B)], [1.0, 0.6], [density, density])
    deltas = [ref_trim(A - BASE, density), ref_trim(B - BASE, density)]
    want = ref_task_family(BASE, [A, B], [1.0, 0.6], deltas, True, True)
    assert np.allclose(got.numpy(), want)


def test_ties_one_element_by_hand():
    # deltas at one element: +2 (w 1), -1 (w 1), -3 (w 1): sum -2 -> elect "-", mean of -1, -3
    base = _t([0.0])
    got = M.task_arithmetic_family(
        M.Method("ties"), base, [_t([2.0]), _t([-1.0]), _t([-3.0])], [1.0] * 3, [1.0] * 3
    )
    assert got.item() == pytest.approx(-2.0)


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties"])
def test_dare_is_seeded_drops_and_rescales(name):
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(64, 32, generator=gen, dtype=torch.float64)
    ts = [base + torch.randn(64, 32, generator=gen, dtype=torch.float64) for _ in range(2)]
    m0, m1 = M.Method(name, seed=0), M.Method(name, seed=1)
    a = M.task_arithmetic_family(m0, base, ts, [1.0, 1.0], [0.3, 0.3], "w")
    again = M.task_arithmetic_family(m0, base, ts, [1.0, 1.0], [0.3, 0.3], "w")
    other = M.task_arithmetic_family(m1, base, ts, [1.0, 1.0], [0.3, 0.3], "w")
    assert torch.equal(a, again) and not torch.equal(a, other)
    # rebuild the result from the drop masks with the numpy reference
    masks = [
        M.random_mask(t - base, 0.3, M.tensor_generator(0, "w", i)).numpy()
        for i, t in enumerate(ts)
    ]
    kept = [m.mean() for m in masks]
    assert all(0.2 < k < 0.4 for k in kept)  # Bernoulli(0.3) over 2,048 elements
    deltas = []
    for t, mask in zip(ts, masks):
        d = (t - base).numpy()
        dm = d * mask
        deltas.append(dm * (np.abs(d).sum() / np.abs(dm).sum()))  # L1 norm matching
    want = ref_task_family(base.numpy(), ts, [1.0, 1.0], deltas, name == "dare_ties", False)
    assert np.allclose(a.numpy(), want)


def test_dare_without_rescale_only_drops():
    base = torch.zeros(1000, dtype=torch.float64)
    t = torch.ones(1000, dtype=torch.float64)
    got = M.task_arithmetic_family(M.Method("dare_linear", rescale=False), base, [t], [1.0], [0.5])
    assert set(got.unique().tolist()) == {0.0, 1.0}


# ---------------------------------------------------------------- against mergekit itself


@pytest.fixture(scope="module")
def mk():
    pytest.importorskip("mergekit", reason="mergekit is a test-only reference (requirements.lock)")
    from mergekit.merge_methods import registry
    from mergekit.merge_methods.base import TensorGroup
    from mergekit.merge_methods.slerp import slerp

    return registry, TensorGroup, slerp


def _random(n_models, seed=0, shape=(16, 8)):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(*shape, generator=g)
    return base, [base + 0.5 * torch.randn(*shape, generator=g) for _ in range(n_models)]


@pytest.mark.parametrize("name", ["task_arithmetic", "ties", "dare_linear", "dare_ties"])
@pytest.mark.parametrize("normalize", [None, True, False])
def test_task_family_equals_mergekit(mk, monkeypatch, name, normalize):
    registry, TensorGroup, _ = mk
    base, ts = _random(3)
    weights, densities = [0.7, 0.4, 1.1], [0.6, 0.3, 0.8]
    method = M.Method(name, normalize=normalize, lam=0.8)
    # both draw DARE's masks from torch's default generator, model by model
    monkeypatch.setattr(M, "tensor_generator", lambda *a: torch.default_generator)
    torch.manual_seed(123)
    ours = M.task_arithmetic_family(method, base, ts, weights, densities, "w")
    mk_method = registry.get(name)
    ids = ["base", "m0", "m1", "m2"]
    group = TensorGroup.from_tensors([base, *ts], ids=ids, base_index=0)
    params = {
        "weight": dict(zip(ids[1:], weights)),
        "density": dict(zip(ids[1:], densities)),
        "normalize": method.default_normalize() if normalize is None else normalize,
        "rescale": method.default_rescale(),
        "int8_mask": False,
        "lambda": 0.8,
    }
    torch.manual_seed(123)
    theirs = mk_method.merge_group(group, **params)
    assert torch.allclose(ours.float(), theirs, atol=1e-6), (ours - theirs).abs().max()


@pytest.mark.parametrize("t", [0.0, 0.3, 0.7, 1.0])
def test_slerp_equals_mergekit(mk, t):
    _, _, mk_slerp = mk
    base, (other,) = _random(1, seed=1)
    theirs = mk_slerp(torch.tensor([t]), base[None], other[None])[0]
    assert torch.allclose(M.slerp(t, base, other).float(), theirs, atol=1e-6)
    theirs = mk_slerp(torch.tensor([t]), base[None], 3 * base[None])[0]  # colinear: lerp
    assert torch.allclose(M.slerp(t, base, 3 * base).float(), theirs, atol=1e-6)
