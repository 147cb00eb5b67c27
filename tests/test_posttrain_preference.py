"""Preference optimisation: pair validation, log-prob gathering, the reference cache, and the
DPO-family losses checked against TRL's DPOTrainer (a test-only reference, pinned in
requirements.lock).

How TRL is driven: a real `DPOTrainer` is built on a tiny local Llama (and a separate local
reference model, so nothing is fetched from the Hub) over four in-memory pairs, with
`precompute_ref_log_probs=True`. Its `compute_loss(model, batch)` is then called on batches from
its own collator. Because TRL reads the reference log-probs from the batch in that mode, the tests
put chosen values there to sweep the log-ratios across the whole loss curve, and compare against
`preference_loss` fed with the policy log-probs we gather ourselves from the same model's logits.
This avoids stubbing TRL internals: only public construction plus `compute_loss` are used.
"""

from __future__ import annotations

import math

import pytest
import torch
from datasets import Dataset
from trl import DPOConfig, DPOTrainer
from trl_tiny import PAD, tiny_llama, tiny_tokenizer

from crucible.config import ConfigError
from crucible.posttrain.logps import sequence_logps
from crucible.posttrain.preference import (
    LOSS_TYPES,
    PreferencePair,
    ReferenceLogps,
    batch_preference_loss,
    cached_reference_logps,
    compute_reference_logps,
    describe_problems,
    pair_batch,
    preference_loss,
    validate_pairs,
)

PAIRS = [
    {"prompt": "a b c", "chosen": " d e", "rejected": " f g h"},
    {"prompt": "x y", "chosen": " z z z z", "rejected": " q"},
    {"prompt": "m", "chosen": " n o p", "rejected": " r s"},
    {"prompt": "k l m n", "chosen": " t", "rejected": " u v w x y"},
]


def _trainer(tmp_path, **config) -> DPOTrainer:
    args = DPOConfig(
        output_dir=str(tmp_path),
        report_to=[],
        bf16=False,
        use_cpu=True,
        per_device_train_batch_size=len(PAIRS),
        max_length=32,
        save_strategy="no",
        precompute_ref_log_probs=True,
        **config,
    )
    trainer = DPOTrainer(
        model=tiny_llama(0),
        ref_model=tiny_llama(1),
        args=args,
        train_dataset=Dataset.from_list(PAIRS),
        processing_class=tiny_tokenizer(),
    )
    trainer.model.train()
    return trainer


def _batch(trainer: DPOTrainer) -> dict[str, torch.Tensor]:
    return trainer.data_collator([trainer.train_dataset[i] for i in range(len(PAIRS))])


def _ours_from_batch(model, batch, ref_c, ref_r, **options):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    seq = sequence_logps(logits, batch["input_ids"], batch["completion_mask"])
    c, r = seq.logps.chunk(2)
    n_c, n_r = seq.n_tokens.chunk(2)
    return preference_loss(c, r, ref_c, ref_r, chosen_tokens=n_c, rejected_tokens=n_r, **options), (
        c,
        r,
    )


# --------------------------------------------------------------------------- log-probs


def test_sequence_logps_matches_a_hand_loop():
    torch.manual_seed(0)
    logits = torch.randn(3, 6, 11)
    ids = torch.randint(0, 11, (3, 6))
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1]])
    seq = sequence_logps(logits, ids, mask)
    for b in range(3):
        expected, n = 0.0, 0
        for t in range(1, 6):
            if mask[b, t]:
                row = logits[b, t - 1].double()
                expected += float(row[ids[b, t]] - torch.logsumexp(row, 0))
                n += 1
        assert seq.logps[b].item() == pytest.approx(expected, abs=1e-5)
        assert seq.n_tokens[b].item() == n


def test_sequence_logps_ignores_minus_inf_outside_the_mask():
    logits = torch.zeros(1, 3, 4)
    logits[0, 0, 2] = -math.inf  # token 2 at position 1 is impossible, but masked out
    ids = torch.tensor([[0, 2, 1]])
    seq = sequence_logps(logits, ids, torch.tensor([[0, 0, 1]]))
    assert torch.isfinite(seq.logps).all()
    assert seq.logps.item() == pytest.approx(-math.log(4))


# --------------------------------------------------------------------------- losses vs TRL


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_loss_equals_trl_on_the_same_logps(tmp_path, loss_type, beta):
    trainer = _trainer(tmp_path, loss_type=[loss_type], beta=beta)
    batch = _batch(trainer)
    gen = torch.Generator().manual_seed(7)
    # Reference values far from the policy's: log-ratios from about -30 to +30.
    for offsets in (torch.rand(len(PAIRS), generator=gen) * 60 - 30, torch.zeros(len(PAIRS))):
        policy = trainer.model
        with torch.no_grad():
            logits = policy(input_ids=batch["input_ids"]).logits
        seq = sequence_logps(logits, batch["input_ids"], batch["completion_mask"])
        c, r = seq.logps.chunk(2)
        ref_c = c + offsets
        ref_r = r - offsets.flip(0) * 0.5
        batch["ref_chosen_logps"], batch["ref_rejected_logps"] = ref_c, ref_r
        with torch.no_grad():
            trl_loss = trainer.compute_loss(policy, batch)
        n_c, n_r = seq.n_tokens.chunk(2)
        ours = preference_loss(
            c,
            r,
            ref_c,
            ref_r,
            loss_type=loss_type,
            beta=beta,
            chosen_tokens=n_c,
            rejected_tokens=n_r,
        )
        assert ours.loss.item() == pytest.approx(trl_loss.item(), abs=1e-6)
        logged = trainer._metrics["train"]
        for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
            assert ours.metrics()[key] == pytest.approx(logged[key][-1], abs=1e-6), key


def test_label_smoothing_is_trl_sigmoid_averaged_over_both_labelings(tmp_path):
    """Conservative DPO: with probability ε the label is flipped. TRL 1.16's sigmoid loss has no
    smoothing, so the reference is TRL's loss on the pair and on the swapped pair, mixed."""
    eps, beta = 0.2, 0.3
    trainer = _trainer(tmp_path, loss_type=["sigmoid"], beta=beta)
    batch = _batch(trainer)
    n = len(PAIRS)
    swapped = {
        "input_ids": torch.cat(batch["input_ids"].chunk(2)[::-1]),
        "attention_mask": torch.cat(batch["attention_mask"].chunk(2)[::-1]),
        "completion_mask": torch.cat(batch["completion_mask"].chunk(2)[::-1]),
    }
    ref_c, ref_r = torch.linspace(-40, -10, n), torch.linspace(-5, -35, n)
    with torch.no_grad():
        # TRL averages over pairs; compare per pair by calling it on one pair at a time.
        for i in range(n):
            rows = [i, i + n]
            one = {
                k: v[rows]
                for k, v in batch.items()
                if k != "ref_chosen_logps" and k != "ref_rejected_logps"
            }
            one_sw = {k: v[rows] for k, v in swapped.items()}
            one.update(ref_chosen_logps=ref_c[i : i + 1], ref_rejected_logps=ref_r[i : i + 1])
            one_sw.update(ref_chosen_logps=ref_r[i : i + 1], ref_rejected_logps=ref_c[i : i + 1])
            expected = (1 - eps) * trainer.compute_loss(trainer.model, one) + eps * (
                trainer.compute_loss(trainer.model, one_sw)
            )
            ours, _ = _ours_from_batch(
                trainer.model,
                one,
                ref_c[i : i + 1],
                ref_r[i : i + 1],
                loss_type="sigmoid",
                beta=beta,
                label_smoothing=eps,
            )
            assert ours.loss.item() == pytest.approx(expected.item(), abs=1e-6)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_whole_batch_loss_and_gradients_agree_with_trl(tmp_path, loss_type):
    """The full path: TRL tokenises the pairs; our `pair_batch` stacks the same token ids into the
    same tensors as TRL's collator; both sides run the model on the batch; the loss and every
    parameter gradient agree. Reference log-probs are TRL's own precomputed ones."""
    trainer = _trainer(tmp_path, loss_type=[loss_type], beta=0.1)
    batch = _batch(trainer)
    rows = [trainer.train_dataset[i] for i in range(len(PAIRS))]
    pairs = [
        PreferencePair(
            (),
            (),
            (),
            index=i,
            prompt_ids=tuple(row["prompt_ids"]),
            chosen_ids=tuple(row["chosen_ids"]),
            rejected_ids=tuple(row["rejected_ids"]),
        )
        for i, row in enumerate(rows)
    ]
    ours_batch = pair_batch(pairs, pad_id=PAD)
    for name in ("input_ids", "attention_mask", "completion_mask"):
        assert torch.equal(getattr(ours_batch, name), batch[name]), name
    model = trainer.model
    model.zero_grad()
    trl_loss = trainer.compute_loss(model, batch)
    trl_loss.backward()
    trl_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logits = model(input_ids=ours_batch.input_ids, attention_mask=ours_batch.attention_mask).logits
    ours = batch_preference_loss(
        logits,
        ours_batch,
        batch["ref_chosen_logps"],
        batch["ref_rejected_logps"],
        loss_type=loss_type,
        beta=0.1,
    )
    ours.loss.backward()
    assert ours.loss.item() == pytest.approx(trl_loss.item(), abs=1e-6)
    for name, p in model.named_parameters():
        scale = trl_grads[name].abs().max().item()
        err = (p.grad - trl_grads[name]).abs().max().item()
        assert err <= 1e-6 + 1e-5 * scale, (name, err, scale)


def test_reference_cache_equals_trl_precomputed_logps(tmp_path):
    trainer = _trainer(tmp_path / "trl", loss_type=["sigmoid"])
    batch = _batch(trainer)
    ref = trainer.ref_model
    n = len(PAIRS)

    def score(indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = indices + [i + n for i in indices]
        logits = ref(
            input_ids=batch["input_ids"][rows], attention_mask=batch["attention_mask"][rows]
        ).logits
        seq = sequence_logps(logits, batch["input_ids"][rows], batch["completion_mask"][rows])
        return seq.logps.chunk(2)

    path = tmp_path / "ref.safetensors"
    cache = cached_reference_logps(path, score, range(n), batch_size=3, fingerprint="ref-v1")
    c, r = cache.get([3, 0, 2, 1])
    torch.testing.assert_close(c, batch["ref_chosen_logps"][[3, 0, 2, 1]], atol=1e-5, rtol=0)
    torch.testing.assert_close(r, batch["ref_rejected_logps"][[3, 0, 2, 1]], atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- reference cache


def test_reference_cache_is_computed_once_and_keyed_by_record(tmp_path):
    calls: list[list[int]] = []

    def score(idx):
        calls.append(idx)
        t = torch.tensor(idx, dtype=torch.float32)
        return -t, -2 * t

    path = tmp_path / "cache" / "ref.safetensors"
    first = cached_reference_logps(path, score, [5, 9, 2], batch_size=2, fingerprint="fp")
    assert calls == [[5, 9], [2]]
    again = cached_reference_logps(path, score, [9, 2], batch_size=2, fingerprint="fp")
    assert calls == [[5, 9], [2]]  # served from the file
    for cache in (first, again):
        c, r = cache.get(torch.tensor([2, 9]))
        assert c.tolist() == [-2.0, -9.0] and r.tolist() == [-4.0, -18.0]
    assert not list(path.parent.glob("*.tmp"))
    # Another model or dataset: recomputed, not reused.
    cached_reference_logps(path, score, [5], batch_size=2, fingerprint="other")
    assert calls[-1] == [5]
    with pytest.raises(ConfigError, match="fingerprint"):
        ReferenceLogps.load(path, fingerprint="fp")
    with pytest.raises(KeyError, match="7"):
        ReferenceLogps.load(path).get([7])


def test_reference_cache_never_overwrites_a_foreign_file(tmp_path):
    path = tmp_path / "notes.safetensors"
    path.write_text("my notes")
    with pytest.raises(ConfigError, match="not a reference log-prob cache"):
        cached_reference_logps(path, lambda i: (torch.zeros(1), torch.zeros(1)), [0], 1, "fp")
    assert path.read_text() == "my notes"


def test_compute_reference_logps_runs_without_grad():
    w = torch.ones(1, requires_grad=True)
    ref = compute_reference_logps(lambda idx: (w * 1.0, w * 2.0), [0], batch_size=1)
    assert not ref.chosen.requires_grad and ref.rejected.item() == 2.0


# --------------------------------------------------------------------------- hand-checked values


def test_losses_on_hand_computed_values():
    c, r = torch.tensor([-10.0]), torch.tensor([-14.0])
    rc, rr = torch.tensor([-11.0]), torch.tensor([-12.0])  # log-ratios +1 and -2, Δ = 3
    beta = 0.5
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    out = preference_loss(c, r, rc, rr, loss_type="sigmoid", beta=beta)
    assert out.loss.item() == pytest.approx(-math.log(sig(1.5)), abs=1e-6)
    assert out.chosen_rewards.item() == pytest.approx(0.5) and out.rejected_rewards.item() == -1.0
    assert out.margins.item() == pytest.approx(1.5) and out.accuracy.item() == 1.0
    out = preference_loss(c, r, rc, rr, loss_type="apo_zero", beta=beta)
    assert out.loss.item() == pytest.approx((1 - sig(0.5)) + sig(-1.0), abs=1e-6)
    out = preference_loss(c, r, rc, rr, loss_type="apo_down", beta=beta)
    assert out.loss.item() == pytest.approx(sig(0.5) + (1 - sig(1.5)), abs=1e-6)
    out = preference_loss(
        c,
        r,
        rc,
        rr,
        loss_type="ipo",
        beta=beta,
        chosen_tokens=torch.tensor([2.0]),
        rejected_tokens=torch.tensor([4.0]),
    )
    assert out.loss.item() == pytest.approx((1 / 2 - (-2) / 4 - 1.0) ** 2, abs=1e-6)


def test_bad_options_are_one_line_config_errors():
    t = torch.zeros(1)
    with pytest.raises(ConfigError, match="loss_type: 'kto' is not one of sigmoid, ipo"):
        preference_loss(t, t, t, t, loss_type="kto")
    with pytest.raises(ConfigError, match="beta: must be > 0"):
        preference_loss(t, t, t, t, beta=0.0)
    with pytest.raises(ConfigError, match="label_smoothing: only the sigmoid"):
        preference_loss(t, t, t, t, loss_type="apo_zero", label_smoothing=0.1)
    with pytest.raises(ValueError, match="ipo loss needs"):
        preference_loss(t, t, t, t, loss_type="ipo")


# --------------------------------------------------------------------------- pair data


def test_validate_pairs_counts_and_names_bad_records():
    conv = lambda answer: [  # noqa: E731
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": answer},
    ]
    records = [
        {"prompt": "hi", "chosen": "hello", "rejected": "go away"},  # 0 good
        {"prompt": "hi", "chosen": "same", "rejected": " same "},  # 1 identical
        {"prompt": "hi", "chosen": "", "rejected": "no"},  # 2 empty
        {"chosen": conv("4"), "rejected": conv("5")},  # 3 good, implicit prompt
        {
            "chosen": conv("4"),
            "rejected": [
                {"role": "user", "content": "3+3?"},
                {"role": "assistant", "content": "5"},
            ],
        },  # 4 mismatched
        {"prompt": "hi", "chosen": "x"},  # 5 missing field
        {
            "prompt": [{"role": "user", "content": "2+2?"}],
            "chosen": conv("4"),
            "rejected": "5",
        },  # 6
        {
            "prompt": [{"role": "user", "content": "1+1?"}],
            "chosen": conv("4"),
            "rejected": "5",
        },  # 7
        {"prompt": "  ", "chosen": "a", "rejected": "b"},  # 8 empty prompt
        {"prompt": "2+2?", "chosen": [{"role": "user", "content": "2+2?"}], "rejected": "5"},  # 9
    ]
    good, problems = validate_pairs(records)
    assert [p.index for p in good] == [0, 3, 6]
    assert good[1].prompt == ({"role": "user", "content": "2+2?"},)
    assert good[1].chosen == ({"role": "assistant", "content": "4"},)
    assert good[2].chosen[0]["content"] == "4" and good[2].rejected[0]["content"] == "5"
    kinds = {p.index: p.kind for p in problems}
    assert kinds == {
        1: "identical",
        2: "empty_completion",
        4: "mismatched_prompt",
        5: "missing_field",
        7: "mismatched_prompt",
        8: "empty_prompt",
        9: "empty_completion",
    }
    line = describe_problems(problems, total=len(records), source="pairs.jsonl")
    assert "\n" not in line
    assert line.startswith("pairs.jsonl: 7 of 10 preference pairs skipped")
    assert "mismatched prompt: 2 (records 4, 7)" in line
    assert "empty completion: 2 (records 2, 9)" in line
    assert "identical chosen and rejected: 1 (record 1)" in line
    assert describe_problems([], total=3) == "pairs: all 3 preference pairs are usable"


def test_pair_batch_takes_rendered_ids_and_feeds_the_loss():
    pairs = [
        PreferencePair(
            prompt=({"role": "user", "content": "p"},),
            chosen=({"role": "assistant", "content": "c"},),
            rejected=({"role": "assistant", "content": "r"},),
            index=0,
            prompt_ids=(5, 6),
            chosen_ids=(7, 1),
            rejected_ids=(8, 9, 1),
        )
    ]
    batch = pair_batch(pairs, pad_id=PAD)
    assert batch.input_ids.tolist() == [[5, 6, 7, 1, 0], [5, 6, 8, 9, 1]]
    assert batch.completion_mask.tolist() == [[0, 0, 1, 1, 0], [0, 0, 1, 1, 1]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    logits = torch.zeros(2, 5, 10)  # uniform: log p = -log 10 per token
    out = batch_preference_loss(
        logits, batch, torch.zeros(1), torch.zeros(1), loss_type="ipo", beta=0.5
    )
    expected = ((-2 * math.log(10)) / 2 - (-3 * math.log(10)) / 3 - 1.0) ** 2
    assert out.loss.item() == pytest.approx(expected, abs=1e-6)
    with pytest.raises(ValueError, match="no rendered token ids"):
        pair_batch([PreferencePair((), (), ())], pad_id=0)


def test_the_library_never_imports_trl():
    """TRL is a test-only reference: the post-training modules must work without it."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import crucible.posttrain.preference, crucible.posttrain.grpo\n"
        "import crucible.posttrain.distill, crucible.posttrain.rewards\n"
        "assert 'trl' not in sys.modules, 'trl imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
