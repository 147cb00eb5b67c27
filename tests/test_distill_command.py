"""`crucible distill`: GKD from a teacher run with the same tokenizer, on the training loop."""

from __future__ import annotations

import json
import shutil

import pytest
from rl_helpers import train_base, train_events, write_config

from crucible.config import ConfigError, load_config
from crucible.posttrain.conversations import write_jsonl as write_conversations
from crucible.posttrain.distill_run import on_policy_step, run_distill
from crucible.posttrain.synthetic import generate


@pytest.fixture(scope="module")
def models(small_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    student = train_base(small_base, root, "student", steps=2)
    teacher = train_base(small_base, root, "teacher", steps=4)
    data = root / "chat.jsonl"
    write_conversations(generate("train", 16, seed=0, tasks={"arithmetic": 1.0}), data)
    return student, teacher, data


def _config(tmp_path, models, name, teacher=None, **options):
    student, default_teacher, data = models
    opts = {"init_from": str(student), "teacher": str(teacher or default_teacher),
            "data": [str(data)], "max_new_tokens": 6, **options}  # fmt: skip
    return write_config(tmp_path / f"{name}.yaml", "distill", opts, out_dir=tmp_path / "runs",
                        name=name, train={"steps": 3, "seq_len": 256})  # fmt: skip


def test_distill_trains_on_and_off_policy(models, tmp_path):
    result = run_distill(load_config(_config(tmp_path, models, "d", lmbda=0.5)), quiet=True)
    events = train_events(result.run_dir)
    assert [e["step"] for e in events] == [1, 2, 3]
    assert all(e["loss"] > 0 for e in events)
    # train_step passes the 1-based step to on_batches
    assert [e["on_policy"] for e in events] == [float(on_policy_step(0.5, 0, s)) for s in (1, 2, 3)]


def test_a_teacher_equal_to_the_student_gives_zero_loss(models, tmp_path):
    student = models[0]
    cfg = _config(tmp_path, models, "same", teacher=student, lmbda=1.0, beta=0.5)
    events = train_events(run_distill(load_config(cfg), quiet=True).run_dir)
    # Before the first update student and teacher are the same model: JSD = 0.
    assert events[0]["loss"] == pytest.approx(0.0, abs=1e-6)


def test_lmbda_is_the_share_of_on_policy_steps():
    for lmbda in (0.0, 0.25, 1.0):
        share = sum(on_policy_step(lmbda, 7, s) for s in range(2000)) / 2000
        assert share == pytest.approx(lmbda, abs=0.03)


def test_a_teacher_with_another_tokenizer_is_refused(models, tmp_path):
    student, teacher, _ = models
    other = tmp_path / "other"
    shutil.copytree(teacher, other)
    tok = json.loads((other / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = [k for k in vocab if not k.startswith("<")][:2]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # same strings, two ids swapped
    (other / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(ConfigError, match="same tokenizer"):
        run_distill(load_config(_config(tmp_path, models, "t", teacher=other)), quiet=True)
    with pytest.raises(ConfigError, match="lmbda"):
        load_config(_config(tmp_path, models, "l", lmbda=1.5))
    assert not (tmp_path / "runs" / "t").exists()
