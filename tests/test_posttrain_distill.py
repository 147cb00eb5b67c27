"""GKD's generalized Jensen-Shannon loss, checked against TRL's static
`GKDTrainer.generalized_jsd_loss` (a test-only reference), and the seeded lmbda chooser."""

from __future__ import annotations

import math

import pytest
import torch
from trl.experimental.gkd import GKDTrainer

from crucible.config import ConfigError
from crucible.posttrain.distill import OnPolicyChooser, generalized_jsd_loss, per_token_jsd


def _logits(seed: int):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(3, 5, 13, generator=g) * 2
    teacher = torch.randn(3, 5, 13, generator=g) * 2
    labels = torch.randint(0, 13, (3, 5), generator=g)
    labels[0, :2] = -100
    labels[2, :] = -100  # a fully masked row
    return student, teacher, labels


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
def test_generalized_jsd_equals_trl(beta, temperature, reduction):
    student, teacher, labels = _logits(0)
    for lab in (labels, None):
        s1 = student.clone().requires_grad_(True)
        s2 = student.clone().requires_grad_(True)
        ref = GKDTrainer.generalized_jsd_loss(
            s1, teacher, labels=lab, beta=beta, temperature=temperature, reduction=reduction
        )
        ours = generalized_jsd_loss(
            s2, teacher, lab, beta=beta, temperature=temperature, reduction=reduction
        )
        if reduction == "none":  # TRL keeps the vocabulary axis; ours sums it per token
            ref = ref.sum(-1)
        torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-6)
        ours.sum().backward()
        ref.sum().backward()
        torch.testing.assert_close(s2.grad, s1.grad, atol=1e-6, rtol=1e-5)


def test_num_items_normalisation_equals_trl():
    student, teacher, labels = _logits(1)
    ref = GKDTrainer.generalized_jsd_loss(student, teacher, labels=labels, num_items_in_batch=17)
    ours = generalized_jsd_loss(student, teacher, labels, num_items=17)
    assert ours.item() == pytest.approx(ref.item(), abs=1e-6)


def test_hand_computed_divergences():
    # Two-token vocabulary: S = (0.5, 0.5), T = (0.9, 0.1).
    s = torch.log(torch.tensor([[[0.5, 0.5]]]))
    t = torch.log(torch.tensor([[[0.9, 0.1]]]))
    forward = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)  # KL(T‖S)
    reverse = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)  # KL(S‖T)
    assert per_token_jsd(s, t, beta=0.0).item() == pytest.approx(forward, abs=1e-6)
    assert per_token_jsd(s, t, beta=1.0).item() == pytest.approx(reverse, abs=1e-6)
    m = (0.7, 0.3)  # mixture 0.5·T + 0.5·S
    kl_t = 0.9 * math.log(0.9 / m[0]) + 0.1 * math.log(0.1 / m[1])
    kl_s = 0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[1])
    assert per_token_jsd(s, t, beta=0.5).item() == pytest.approx(0.5 * kl_t + 0.5 * kl_s, abs=1e-6)
    assert per_token_jsd(t, t, beta=0.3).item() == pytest.approx(0.0, abs=1e-7)


def test_masked_tokens_do_not_count_and_an_all_masked_batch_is_zero():
    student, teacher, labels = _logits(2)
    changed = student.clone()
    changed[labels == -100] += 50.0
    a = generalized_jsd_loss(student, teacher, labels)
    b = generalized_jsd_loss(changed, teacher, labels)
    assert a.item() == pytest.approx(b.item(), abs=1e-6)
    none = generalized_jsd_loss(student, teacher, torch.full_like(labels, -100))
    assert none.item() == 0.0


def test_bad_inputs():
    s = torch.zeros(1, 2, 5)
    with pytest.raises(ValueError, match="tokenizers must match"):
        per_token_jsd(s, torch.zeros(1, 2, 6))
    with pytest.raises(ConfigError, match="beta: must be in \\[0, 1\\]"):
        per_token_jsd(s, s, beta=1.5)
    with pytest.raises(ConfigError, match="temperature: must be > 0"):
        per_token_jsd(s, s, temperature=0.0)
    with pytest.raises(ConfigError, match="reduction: 'avg'"):
        generalized_jsd_loss(s, s, reduction="avg")
    with pytest.raises(ConfigError, match="lmbda: must be in \\[0, 1\\]"):
        OnPolicyChooser(1.2)


def test_lmbda_is_the_share_of_student_generated_batches():
    chooser = OnPolicyChooser(0.3, seed=5)
    draws = [chooser() for _ in range(4000)]
    share = sum(draws) / len(draws)
    assert abs(share - 0.3) < 4 * math.sqrt(0.3 * 0.7 / len(draws))  # 4 binomial sigmas
    again = OnPolicyChooser(0.3, seed=5)
    assert [again() for _ in range(50)] == draws[:50]  # seeded: reproducible
    assert not any(OnPolicyChooser(0.0)() for _ in range(200))
    assert all(OnPolicyChooser(1.0)() for _ in range(200))


def test_chooser_state_resumes_the_sequence():
    c = OnPolicyChooser(0.5, seed=1)
    [c() for _ in range(7)]
    state = c.state()
    rest = [c() for _ in range(20)]
    d = OnPolicyChooser(0.5, seed=99)
    d.restore(state)
    assert [d() for _ in range(20)] == rest
