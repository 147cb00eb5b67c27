"""The GRPO family checked against TRL's GRPOTrainer (a test-only reference).

How TRL is driven: a real `GRPOTrainer` is built per configuration on a tiny local Llama and a
4-prompt in-memory dataset (no downloads). Then:
- the loss: `trainer.compute_loss(model, inputs)` on hand-made inputs (prompt/completion ids and
  masks, advantages, old and reference per-token log-probs, num_items_in_batch). For "the same
  log-probabilities" the trainer's per-token log-prob method is replaced, on that instance only,
  by one returning a tensor we chose, so TRL's loss arithmetic runs on exactly our inputs; the
  per-token loss is read out one token at a time (a one-hot completion mask with bnpo
  aggregation returns that token's loss). A second test leaves the trainer whole and runs the
  model on both sides.
- advantages and truncation masking: `trainer._generate_and_score_completions` on repeated
  prompts, with reward functions that return preset values (None included), compared with
  `group_advantages` / `combine_rewards` / `truncated`.
"""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer
from trl.rewards import get_soft_overlong_punishment
from trl_tiny import EOS, PAD, tiny_llama, tiny_tokenizer

from crucible.config import ConfigError
from crucible.posttrain.grpo import (
    LOSS_TYPES,
    SCALE_REWARDS,
    aggregate_loss,
    combine_rewards,
    group_advantages,
    mask_truncated,
    per_token_policy_loss,
    policy_loss,
    soft_overlong_penalty,
    truncated,
    validate_group_size,
)
from crucible.posttrain.logps import shifted_token_logps

PROMPTS = ["a b c", "x y", "d e", "q r s"]
MAX_LEN = 6


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The tiny model saved locally: with beta > 0 TRL loads the reference model by path."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(0).save_pretrained(path)
    return str(path)


def _trainer(tmp_path, model_dir, reward_funcs=None, **config) -> GRPOTrainer:
    settings = {"per_device_train_batch_size": 4, "num_generations": 2, **config}
    args = GRPOConfig(
        output_dir=str(tmp_path),
        report_to=[],
        bf16=False,
        use_cpu=True,
        max_completion_length=MAX_LEN,
        save_strategy="no",
        **settings,
    )
    trainer = GRPOTrainer(
        model=model_dir,
        reward_funcs=reward_funcs or (lambda completions, **kw: [0.0] * len(completions)),
        args=args,
        train_dataset=Dataset.from_list([{"prompt": p} for p in PROMPTS]),
        processing_class=tiny_tokenizer(),
    )
    trainer.model.train()
    # transformers' training loop sets this before each step; the loss divides by it.
    trainer.current_gradient_accumulation_steps = args.gradient_accumulation_steps
    return trainer


def _fake_batch(seed: int):
    """B=4 completions of T=MAX_LEN tokens with ragged masks (one row fully masked)."""
    g = torch.Generator().manual_seed(seed)
    B, T = 4, MAX_LEN
    logps = -torch.rand(B, T, generator=g) * 3 - 0.05
    # Old log-probs off by up to ±0.6 nats: ratios from about 0.55 to 1.8, clipped on both sides.
    old = logps + (torch.rand(B, T, generator=g) - 0.5) * 1.2
    ref = logps + (torch.rand(B, T, generator=g) - 0.5) * 2.0
    adv = torch.tensor([1.3, -0.7, 0.4, -1.1])
    mask = torch.tensor(
        [[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0]]
    )
    return logps, old, ref, adv, mask


def _trl_inputs(adv, mask, old, ref=None, num_items=None):
    B, T = mask.shape
    inputs = {
        "prompt_ids": torch.full((B, 2), 3),
        "prompt_mask": torch.ones(B, 2, dtype=torch.long),
        "completion_ids": torch.full((B, T), 4),
        "completion_mask": mask,
        "advantages": adv,
        "old_per_token_logps": old,
        "num_items_in_batch": torch.tensor(float(mask.sum() if num_items is None else num_items)),
    }
    if ref is not None:
        inputs["ref_per_token_logps"] = ref
    return inputs


def _with_logps(trainer: GRPOTrainer, logps: torch.Tensor) -> None:
    """Make this trainer instance score every token with `logps` (entropy zero)."""

    def fixed(model, input_ids, attention_mask, logits_to_keep, **kw):
        return logps, torch.zeros_like(logps), None

    trainer._get_per_token_logps_and_entropies = fixed


OPTIONS = {"epsilon": 0.2, "epsilon_high": 0.28, "beta": 0.04}


def test_per_token_loss_equals_trl(tmp_path, model_dir):
    trainer = _trainer(tmp_path, model_dir, loss_type="bnpo", **OPTIONS)
    logps, old, ref, adv, mask = _fake_batch(0)
    ours, kl, ratio = per_token_policy_loss(logps, old, adv, ref_logps=ref, **OPTIONS)
    assert ((ratio < 0.8) & (adv[:, None] < 0)).any() and (
        (ratio > 1.28) & (adv[:, None] > 0)
    ).any()
    _with_logps(trainer, logps)
    B, T = logps.shape
    for b in range(B):
        for t in range(T):
            one_hot = torch.zeros(B, T, dtype=torch.long)
            one_hot[b, t] = 1
            with torch.no_grad():
                trl_value = trainer.compute_loss(trainer.model, _trl_inputs(adv, one_hot, old, ref))
            assert ours[b, t].item() == pytest.approx(trl_value.item(), abs=1e-6), (b, t)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize(("beta", "correction"), [(0.0, True), (0.04, True), (0.04, False)])
def test_aggregated_loss_and_gradient_equal_trl(tmp_path, model_dir, loss_type, beta, correction):
    options = {**OPTIONS, "beta": beta}
    trainer = _trainer(
        tmp_path, model_dir, loss_type=loss_type, use_bias_correction_kl=correction, **options
    )
    logps, old, ref, adv, mask = _fake_batch(1)
    # dapo: also a token count spanning more than this micro-batch (gradient accumulation).
    for num_items in (None, 40) if loss_type == "dapo" else (None,):
        lp_trl = logps.clone().requires_grad_(True)
        _with_logps(trainer, lp_trl)
        trl_loss = trainer.compute_loss(trainer.model, _trl_inputs(adv, mask, old, ref, num_items))
        trl_loss.backward()
        lp = logps.clone().requires_grad_(True)
        out = policy_loss(
            lp,
            old,
            adv,
            mask,
            loss_type=loss_type,
            ref_logps=ref,
            max_completion_length=MAX_LEN,
            num_items=num_items,
            kl_bias_correction=correction,
            **options,
        )
        out.loss.backward()
        assert out.loss.item() == pytest.approx(trl_loss.item(), abs=1e-6)
        torch.testing.assert_close(lp.grad, lp_trl.grad, atol=1e-6, rtol=0)
        logged = trainer._metrics["train"]
        assert out.metrics(mask)["clip_ratio/high_mean"] == pytest.approx(
            logged["clip_ratio/high_mean"][-1], abs=1e-6
        )
        if beta:
            assert out.metrics(mask)["kl"] == pytest.approx(logged["kl"][-1], abs=1e-6)


def test_dr_grpo_divides_by_max_completion_length_not_the_tokens():
    per_token = torch.ones(2, 5)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 0, 0, 0, 0]])
    dr = aggregate_loss(per_token, mask, "dr_grpo", max_completion_length=10)
    assert dr.item() == pytest.approx(3 / 20)
    assert aggregate_loss(per_token, mask, "bnpo").item() == 1.0
    assert aggregate_loss(per_token, mask, "grpo").item() == 1.0
    assert aggregate_loss(per_token, mask, "dapo", num_items=6).item() == 0.5
    assert aggregate_loss(per_token, mask, "grpo", grad_accum_steps=4).item() == 0.25


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_whole_batch_through_the_model_equals_trl(tmp_path, model_dir, loss_type):
    """No replacement: TRL runs its own fused log-prob head (with temperature); we run the
    model's logits through `shifted_token_logps`. Loss and every parameter gradient agree."""
    temperature = 0.7
    trainer = _trainer(tmp_path, model_dir, loss_type=loss_type, temperature=temperature, **OPTIONS)
    _, old, ref, adv, mask = _fake_batch(2)
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(2, 28, (4, 3), generator=g)
    completion = torch.randint(1, 28, (4, MAX_LEN), generator=g)
    mask = torch.tensor([[1] * 6, [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0], [1, 0, 0, 0, 0, 0]])
    inputs = _trl_inputs(adv, mask, old, ref)
    inputs.update(prompt_ids=prompt, prompt_mask=torch.ones_like(prompt), completion_ids=completion)
    model = trainer.model
    model.zero_grad()
    trl_loss = trainer.compute_loss(model, inputs)
    trl_loss.backward()
    trl_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ids = torch.cat([prompt, completion], 1)
    attn = torch.cat([torch.ones_like(prompt), mask], 1)
    logits = model(input_ids=ids, attention_mask=attn).logits
    logps = shifted_token_logps(logits, ids, temperature)[:, -MAX_LEN:]
    out = policy_loss(
        logps,
        old,
        adv,
        mask,
        loss_type=loss_type,
        ref_logps=ref,
        max_completion_length=MAX_LEN,
        **OPTIONS,
    )
    out.loss.backward()
    assert out.loss.item() == pytest.approx(trl_loss.item(), abs=1e-6)
    for name, p in model.named_parameters():
        scale = trl_grads[name].abs().max().item()
        err = (p.grad - trl_grads[name]).abs().max().item()
        assert err <= 1e-6 + 1e-5 * scale, (name, err, scale)


# --------------------------------------------------------------------------- advantages


class _Preset:
    """A reward function returning preset values in call order (TRL passes completions)."""

    def __init__(self, name: str) -> None:
        self.__name__ = name
        self.queue: list[float | None] = []

    def __call__(self, completions, **kwargs):
        out, self.queue = self.queue[: len(completions)], self.queue[len(completions) :]
        return out


@pytest.mark.parametrize("scale_rewards", SCALE_REWARDS)
def test_advantages_equal_trl(tmp_path, model_dir, scale_rewards):
    correct, fmt = _Preset("correct"), _Preset("format")
    weights = [1.0, 0.5]
    trainer = _trainer(
        tmp_path,
        model_dir,
        reward_funcs=[correct, fmt],
        reward_weights=weights,
        scale_rewards=scale_rewards,
        per_device_train_batch_size=8,
        num_generations=4,
    )
    rows = [{"prompt": PROMPTS[0]}] * 4 + [{"prompt": PROMPTS[1]}] * 4
    # Group 1 mixes values and one failed verifier; group 2 has an unscorable completion (both None).
    correct_r = [1.0, 0.0, None, 1.0, 0.0, 0.0, None, 1.0]
    format_r = [1.0, 1.0, 0.5, 0.0, 1.0, 0.0, None, 0.25]
    correct.queue, fmt.queue = list(correct_r), list(format_r)
    with torch.no_grad():
        out = trainer._generate_and_score_completions(rows)
    rewards = combine_rewards([correct_r, format_r], weights)
    assert torch.isnan(rewards[6]) and rewards[2].item() == 0.25
    ours = group_advantages(rewards, group_size=4, scale_rewards=scale_rewards)
    torch.testing.assert_close(ours, out["advantages"], atol=1e-6, rtol=0)
    assert ours[6].item() == 0.0


def test_advantages_on_hand_computed_values():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 2.0])
    a = group_advantages(r, 3, "none")
    torch.testing.assert_close(a, torch.tensor([2 / 3, -1 / 3, -1 / 3, -4 / 3, 2 / 3, 2 / 3]))
    std = (1 / 3) ** 0.5  # Bessel-corrected std of (1, 0, 0)
    g = group_advantages(r, 3, "group")
    assert g[0].item() == pytest.approx((2 / 3) / (std + 1e-4), abs=1e-6)
    assert g[3].item() == pytest.approx(-4 / 3 / ((4 / 3) ** 0.5 + 1e-4), abs=1e-6)
    same = group_advantages(torch.ones(4), 2, "group")
    assert same.abs().max().item() == 0.0  # a group that agrees teaches nothing


def test_truncated_completions_are_masked_like_trl(tmp_path, model_dir):
    # A bias towards EOS so that some completions stop and others run to the length limit.
    trainer = _trainer(
        tmp_path,
        model_dir,
        mask_truncated_completions=True,
        per_device_train_batch_size=8,
        num_generations=8,
        generation_kwargs={"sequence_bias": {(EOS,): 2.5}},
    )
    torch.manual_seed(4)
    with torch.no_grad():
        out = trainer._generate_and_score_completions([{"prompt": PROMPTS[2]}] * 8)
    ids = out["completion_ids"].tolist()
    completions = [row[: row.index(EOS) + 1] if EOS in row else row for row in ids]
    flags = truncated(completions, eos_ids=[EOS], pad_id=PAD)
    assert 0 < int(flags.sum()) < 8, "want both kinds in the sample"
    plain = (out["completion_ids"] != PAD).long()  # unmasked shape for the check below
    expected_rows_zeroed = out["completion_mask"].sum(1) == 0
    assert flags.tolist() == expected_rows_zeroed.tolist()
    assert (mask_truncated(plain, flags).sum(1) == 0).tolist() == flags.tolist()


def test_truncated_rule():
    flags = truncated([[5, 6, EOS], [5, 6, 7], [5, PAD], []], eos_ids=[EOS], pad_id=PAD)
    assert flags.tolist() == [False, True, False, False]


# --------------------------------------------------------------------------- overlong, validation


def test_soft_overlong_penalty_equals_trl():
    lengths = [0, 50, 80, 81, 90, 99, 100, 101, 300]
    trl_fn = get_soft_overlong_punishment(max_completion_len=100, soft_punish_cache=20)
    expected = trl_fn([[7] * n for n in lengths])
    assert soft_overlong_penalty(lengths, max_length=100, cache_length=20) == pytest.approx(
        expected
    )
    assert soft_overlong_penalty([90], 100, 20) == [-0.5]
    assert soft_overlong_penalty([100, 101], 100, 0) == [0.0, -1.0]  # no soft zone: a hard cliff
    with pytest.raises(ConfigError, match="cache_length <= max_length"):
        soft_overlong_penalty([1], 10, 20)


def test_group_size_must_divide_the_batch():
    validate_group_size(16, 4)
    with pytest.raises(ConfigError) as e:
        validate_group_size(12, 8, where="grpo")
    assert str(e.value) == (
        "grpo.group_size: 8 must divide the batch of 12 completions (batch = prompts x group_size)"
    )
    with pytest.raises(ConfigError, match="must be >= 2"):
        validate_group_size(4, 1)
    with pytest.raises(ConfigError, match="must divide"):
        group_advantages(torch.zeros(6), 4)


def test_bad_options_are_config_errors():
    z = torch.zeros(1, 2)
    with pytest.raises(
        ConfigError, match="loss_type: 'ppo' is not one of grpo, bnpo, dr_grpo, dapo"
    ):
        policy_loss(z, z, torch.zeros(1), z, loss_type="ppo")
    with pytest.raises(ConfigError, match="max_completion_length"):
        policy_loss(z, z, torch.zeros(1), z, loss_type="dr_grpo")
    with pytest.raises(ConfigError, match="scale_rewards: 'std'"):
        group_advantages(torch.zeros(4), 2, "std")
    with pytest.raises(ValueError, match="reference"):
        policy_loss(z, z, torch.zeros(1), z, beta=0.1)
    with pytest.raises(ConfigError, match="reward_weights: 1 weights for 2"):
        combine_rewards([[1.0], [1.0]], [1.0])
