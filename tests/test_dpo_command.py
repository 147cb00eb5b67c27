"""`crucible dpo`: preference optimisation on the training loop, from a tiny base run."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from rl_helpers import cli, train_base, train_events, write_config, write_jsonl
from safetensors.torch import load_file

from crucible.config import ConfigError, load_config
from crucible.posttrain.dpo_run import REFERENCE_CACHE, run_dpo


@pytest.fixture(scope="module")
def base(small_base, tmp_path_factory):
    return train_base(small_base, tmp_path_factory.mktemp("dpo-base"))


def _pairs(n: int = 12) -> list[dict]:
    return [{"prompt": f"What is {a} + {a + 1}?", "chosen": f"The answer is {2 * a + 1}.",
             "rejected": f"The answer is {2 * a + 3}."} for a in range(n)]  # fmt: skip


def _config(tmp_path, base, name, **options):
    data = write_jsonl(tmp_path / "pairs.jsonl", _pairs())
    return write_config(tmp_path / f"{name}.yaml", "dpo",
                        {"init_from": str(base), "data": [str(data)], **options},
                        out_dir=tmp_path / "runs", name=name)  # fmt: skip


def test_apo_zero_trains_and_logs_rewards(base, tmp_path):
    result = run_dpo(load_config(_config(tmp_path, base, "apo", loss_type="apo_zero")), quiet=True)
    events = train_events(result.run_dir)
    assert [e["step"] for e in events] == [1, 2, 3]
    first = events[0]
    # Step 1: the policy is the reference, so both log-ratios are 0 and
    # apo_zero = (1 - sigmoid(0)) + sigmoid(0) = 1, with zero rewards.
    assert first["loss"] == pytest.approx(1.0, abs=1e-6)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert first[key] == pytest.approx(0.0, abs=1e-6)
    assert "rewards/accuracies" in first
    assert events[-1]["rewards/margins"] != 0.0  # the policy moved away from the reference
    assert (result.run_dir / REFERENCE_CACHE).is_file()
    assert (result.run_dir / "summary.json").is_file()


def test_cached_and_on_the_fly_reference_agree(base, tmp_path):
    a = run_dpo(load_config(_config(tmp_path, base, "cached")), quiet=True)
    b = run_dpo(load_config(_config(tmp_path, base, "fly", reference="on_the_fly")), quiet=True)
    ea, eb = train_events(a.run_dir), train_events(b.run_dir)
    assert ea[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # -log sigmoid(0)
    for x, y in zip(ea, eb, strict=True):
        for key in ("loss", "rewards/margins", "rewards/chosen"):
            assert x[key] == pytest.approx(y[key], abs=1e-5), key


def test_bad_pairs_are_counted_and_named(base, tmp_path, capsys):
    records = [*_pairs(4),
               {"prompt": "Same?", "chosen": "yes", "rejected": "yes"},
               {"prompt": "Empty?", "chosen": "", "rejected": "no"},
               {"chosen": [{"role": "user", "content": "A"}, {"role": "assistant", "content": "1"}],
                "rejected": [{"role": "user", "content": "B"}, {"role": "assistant", "content": "2"}]},
               ]  # fmt: skip
    data = write_jsonl(tmp_path / "bad.jsonl", records)
    cfg = write_config(tmp_path / "bad.yaml", "dpo", {"init_from": str(base), "data": [str(data)]},
                       out_dir=tmp_path / "runs", name="bad", train={"steps": 1})  # fmt: skip
    run_dpo(load_config(cfg))
    out = capsys.readouterr().out
    assert "3 of 7 preference pairs skipped" in out
    assert "identical chosen and rejected: 1 (record 4)" in out
    assert "empty completion: 1 (record 5)" in out
    assert "mismatched prompt: 1 (record 6)" in out


def test_nothing_usable_fails_before_the_run_directory(base, tmp_path):
    data = write_jsonl(tmp_path / "none.jsonl", [{"prompt": "p", "chosen": "x", "rejected": "x"}])
    cfg = write_config(tmp_path / "none.yaml", "dpo", {"init_from": str(base), "data": [str(data)]},
                       out_dir=tmp_path / "runs", name="none")  # fmt: skip
    out = cli(["dpo", str(cfg)])
    assert out.returncode == 2, out.stderr
    assert "no usable preference pairs" in out.stderr and "identical" in out.stderr
    assert not (tmp_path / "runs" / "none").exists()
    with pytest.raises(ConfigError, match="dpo.init_from"):
        run_dpo(load_config(cfg, [f"dpo.init_from={tmp_path / 'missing'}"]))
    with pytest.raises(ConfigError, match="loss_type"):
        load_config(cfg, ["dpo.loss_type=hinge"])


@pytest.mark.slow
def test_sigkill_then_resume_is_bitwise_identical(base, tmp_path):
    common = ["train.steps=8", "checkpoint.every=2"]
    cfg = _config(tmp_path, base, "ref")
    ref = cli(["dpo", str(cfg), *common, "--quiet"])
    assert ref.returncode == 0, ref.stderr
    chaos = tmp_path / "chaos"
    chaos.write_text("step@5")
    env = {**os.environ, "CRUCIBLE_CHAOS_FILE": str(chaos)}
    args = [sys.executable, "-m", "crucible", "dpo", str(cfg), *common, "name=killed", "--quiet"]
    killed = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr  # SIGKILL after step 5
    run_dir = tmp_path / "runs" / "killed"
    assert not (run_dir / "summary.json").exists()
    resumed = cli(["dpo", str(cfg), *common, "name=killed", "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed" in resumed.stdout
    a = load_file(str(tmp_path / "runs/ref/checkpoints/step_000008/model.safetensors"))
    b = load_file(str(run_dir / "checkpoints/step_000008/model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    steps = [e["step"] for e in train_events(run_dir)]
    assert steps == list(range(1, 9))
    assert json.loads((run_dir / "summary.json").read_text())["step"] == 8
