"""`crucible grpo`: sampling, rewards, advantages and the GRPO loss on the training loop."""

from __future__ import annotations

import pytest
from rl_helpers import cli, train_base, train_events, write_config, write_jsonl

from crucible.config import ConfigError, load_config
from crucible.model.generate import generate
from crucible.posttrain.grpo_run import run_grpo
from crucible.posttrain.rollout import ChatPrompter, sample_completions
from crucible.tokenizer.train import load_tokenizer
from crucible.train.init_from import load_base


@pytest.fixture(scope="module")
def base(small_base, tmp_path_factory):
    return train_base(small_base, tmp_path_factory.mktemp("grpo-base"))


def _config(tmp_path, base, name, train=None, **options):
    opts = {"init_from": str(base), "prompts": "synthetic:arithmetic", "num_prompts": 16,
            "group_size": 2, "max_completion_length": 6, **options}  # fmt: skip
    return write_config(tmp_path / f"{name}.yaml", "grpo", opts, out_dir=tmp_path / "runs",
                        name=name, train={"steps": 2, **(train or {})})  # fmt: skip


def test_batched_sampling_matches_one_by_one_generation(base):
    b = load_base(base)
    model = b.build().eval()
    prompter = ChatPrompter.from_tokenizer(load_tokenizer(b.tokenizer_path))
    prompts = [prompter.prompt_ids([{"role": "user", "content": t}], {"enable_thinking": False})
               for t in ("What is 2 + 3?", "What is 4 + 5?", "Hello there, how are you today?")]  # fmt: skip
    got = sample_completions(model, prompts, 2, 7, prompter.stop_ids, prompter.pad_id,
                             temperature=0.0)  # fmt: skip
    for i, p in enumerate(prompts):
        want = generate(model, p, 7, temperature=0.0, eos_token_id=prompter.stop_ids)
        assert got[2 * i] == want and got[2 * i + 1] == want


def test_grpo_trains_with_kl_and_overlong_penalty(base, tmp_path):
    cfg = _config(tmp_path, base, "g", beta=0.1, overlong_penalty=True, overlong_cache=3,
                  mask_truncated=False, temperature=1.5)  # fmt: skip
    events = train_events(run_grpo(load_config(cfg), quiet=True).run_dir)
    assert [e["step"] for e in events] == [1, 2]
    for key in ("reward", "accuracy", "completion_length", "truncated", "kl", "reward_errors"):
        assert key in events[0], key
    # A near-random base model runs into the length limit: the full penalty is -1 per sample.
    assert events[0]["truncated"] == 1.0 and events[0]["reward"] == pytest.approx(-1.0)
    assert events[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # the policy is the reference


def test_truncated_completions_are_masked(base, tmp_path):
    # A reward that differs between samples of a near-random model (does the text contain "e"?),
    # so advantages are not zero and only the mask can silence the loss.
    prompts = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": f"Write {w}.", "format_pattern": "(?s).*e.*"} for w in ("one", "two", "six")
    ])  # fmt: skip
    common = dict(prompts=str(prompts), verifiers=["format"], group_size=4, temperature=2.0,
                  train={"global_batch_size": 8, "micro_batch_size": 4})  # fmt: skip
    masked = run_grpo(load_config(_config(tmp_path, base, "m", **common)), quiet=True)
    events = train_events(masked.run_dir)
    assert all(e["truncated"] == 1.0 for e in events)
    assert 0 < sum(e["reward"] for e in events) < len(events)  # rewards vary
    assert all(e["grad_norm"] == 0.0 and e["loss"] == 0.0 for e in events)  # nothing counts
    kept = run_grpo(load_config(_config(tmp_path, base, "k", mask_truncated=False, **common)),
                    quiet=True)  # fmt: skip
    assert all(e["grad_norm"] > 0 for e in train_events(kept.run_dir))


def test_group_size_must_divide_the_batch_before_sampling(base, tmp_path):
    cfg = _config(tmp_path, base, "bad", group_size=4, train={"global_batch_size": 6,
                                                              "micro_batch_size": 2})  # fmt: skip
    out = cli(["grpo", str(cfg)])
    assert out.returncode == 2, out.stderr
    assert "grpo.group_size: 4 must divide the batch of 6" in out.stderr
    assert not (tmp_path / "runs" / "bad").exists()
    # checked before the model is even looked at
    with pytest.raises(ConfigError, match="group_size"):
        run_grpo(load_config(cfg, [f"grpo.init_from={tmp_path / 'nowhere'}"]))
    with pytest.raises(ConfigError, match="verifier"):
        run_grpo(load_config(cfg, ["grpo.group_size=2", "grpo.verifiers=[psychic]"]))


def test_a_raising_verifier_marks_the_sample_not_the_run(base, tmp_path, capsys):
    prompts = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "Say 1", "answer": "1", "pattern": r"(\d+)"},
        {"prompt": "Say 2", "answer": "2", "pattern": "(unclosed"},  # re.error in the verifier
    ])  # fmt: skip
    cfg = _config(tmp_path, base, "v", prompts=str(prompts), verifiers=["regex"],
                  mask_truncated=False)  # fmt: skip
    events = train_events(run_grpo(load_config(cfg)).run_dir)
    assert events[0]["reward_errors"] > 0  # averaged over micro-batches: some samples failed
    assert "verifier error" in capsys.readouterr().out


def test_prompt_files_and_system_prompts(tmp_path):
    from crucible.posttrain.grpo_run import read_prompts, with_system

    good = write_jsonl(tmp_path / "good.jsonl", [
        {"prompt": "Say 1", "answer": "1"},
        {"prompt": [{"role": "system", "content": "Own."}, {"role": "user", "content": "Hi"}]},
    ])  # fmt: skip
    prompts = with_system(read_prompts(str(good), think=False), "Be brief.")
    assert prompts[0].messages[0] == {"role": "system", "content": "Be brief."}
    assert prompts[0].columns == {"answer": "1"}
    assert prompts[1].messages[0]["content"] == "Own."  # an existing system message is kept
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"question": "no prompt"}\nnot json\n')
    with pytest.raises(ConfigError, match=r"2 lines without a JSON `prompt` \(lines 2, 3\)"):
        read_prompts(str(bad), think=False)


def test_heldout_accuracy_greedy_and_seeded_samples(base):
    import torch

    from crucible.posttrain.grpo_run import Prompt, heldout_accuracy
    from crucible.posttrain.rewards import last_number_reward

    b = load_base(base)
    model = b.build().eval()
    prompter = ChatPrompter.from_tokenizer(load_tokenizer(b.tokenizer_path))
    prompts = [Prompt(({"role": "user", "content": f"What is {i} + 1?"},), {"answer": str(i + 1)},
                      {"enable_thinking": False}, f"p{i}") for i in range(3)]  # fmt: skip
    ids = [prompter.prompt_ids(p.messages, p.template_kwargs) for p in prompts]

    def by_hand(comps, n):  # completions are grouped by prompt: i // n is the prompt
        hits = [last_number_reward(prompter.text(c), str(i // n + 1)) for i, c in enumerate(comps)]
        return sum(hits) / len(hits), sum(map(len, comps)) / len(comps)

    greedy = sample_completions(model, ids, 1, 6, prompter.stop_ids, prompter.pad_id,
                                temperature=0.0)  # fmt: skip
    assert heldout_accuracy(model, prompter, prompts, max_new_tokens=6) == by_hand(greedy, 1)
    gen = torch.Generator().manual_seed(5)
    sampled = sample_completions(model, ids, 4, 6, prompter.stop_ids, prompter.pad_id,
                                 temperature=1.0, generator=gen)  # fmt: skip
    got = heldout_accuracy(model, prompter, prompts, max_new_tokens=6, samples=4,
                           temperature=1.0, seed=5)  # fmt: skip
    assert got == by_hand(sampled, 4)
    assert sampled != [c for c in greedy for _ in range(4)]  # really sampled, not greedy
