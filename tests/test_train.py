"""End-to-end training: the run directory, resume bit-exactness, and bad input."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from crucible.config import ConfigError, load_config
from crucible.train.checkpoint import list_checkpoints
from crucible.train.trainer import train


def _cli(args: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "crucible", *args], capture_output=True, text=True, **kw
    )


def test_train_writes_complete_run_directory(small_overrides):
    cfg = load_config(
        "tiny",
        [*small_overrides, "name=e2e", "train.steps=12", "train.val_every=6",
         "train.log_every=3", "checkpoint.every=4", "checkpoint.keep_last=2",
         "schedule.warmup_steps=2"],
    )  # fmt: skip
    result = train(cfg, quiet=True)
    run = cfg.run_dir
    assert load_config(run / "config.yaml") == cfg
    events = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train_ev = [e for e in events if e["event"] == "train"]
    val_ev = [e for e in events if e["event"] == "val"]
    assert [e["step"] for e in train_ev] == [3, 6, 9, 12]
    assert [e["step"] for e in val_ev] == [6, 12]
    assert train_ev[-1]["loss"] < train_ev[0]["loss"]
    assert 0 < val_ev[-1]["val_bpb"] < 8
    assert [s for s, _ in list_checkpoints(run / "checkpoints")] == [8, 12]  # keep_last=2
    summary = json.loads((run / "summary.json").read_text())
    assert summary["step"] == 12 and summary["val_loss"] == pytest.approx(result.val["val_loss"])


def _wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else "exited early"
        if metrics.exists():
            steps = [json.loads(x).get("step", 0) for x in metrics.read_text().splitlines() if x]
            if steps and max(steps) >= step:
                return
        time.sleep(0.05)
    raise TimeoutError(f"step {step} never logged")


@pytest.mark.slow
def test_sigkill_then_resume_is_bitwise_identical(small_overrides, tmp_path):
    common = [*small_overrides, "train.steps=14", "train.log_every=1", "train.val_every=5",
              "checkpoint.every=3", "train.dtype=fp32"]  # fmt: skip
    ref = _cli(["train", "tiny", *common, "name=reference"])
    assert ref.returncode == 0, ref.stderr
    # killed after step 8, between checkpoints, deterministically (a timed kill can race the end)
    chaos = tmp_path / "chaos"
    chaos.write_text("step@8")
    env = {**os.environ, "CRUCIBLE_CHAOS_FILE": str(chaos)}
    killed = _cli(["train", "tiny", *common, "name=killed"], env=env)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    run_dir = tmp_path / "runs" / "killed"
    assert not (run_dir / "summary.json").exists()
    resumed = _cli(["train", "tiny", *common, "name=killed", "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed" in resumed.stdout
    a = load_file(str(tmp_path / "runs/reference/checkpoints/step_000014/model.safetensors"))
    b = load_file(str(run_dir / "checkpoints/step_000014/model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k  # exact, element for element
    # the resumed run's metrics have no duplicate steps
    steps = [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()
             if json.loads(x)["event"] == "train"]  # fmt: skip
    assert steps == list(range(1, 15))


def test_bad_input_fails_before_creating_a_run(small_overrides, small_data, tmp_path):
    runs = tmp_path / "runs"

    def fails(extra: list[str], expect: str) -> None:
        out = _cli(["train", "tiny", *small_overrides, *extra])
        assert out.returncode == 2, out.stdout + out.stderr
        assert expect in out.stderr, out.stderr
        assert "Traceback" not in out.stderr
        assert not any(runs.glob("*/summary.json"))

    fails(["name=a", "data.tokenizer=/nonexistent/tokenizer.json"], "/nonexistent/tokenizer.json")
    fails(["name=b", "model.vocab_size=100"], "model.vocab_size")
    fails(["name=c", "train.seq_len=128"], "max_seq_len")
    fails(["name=d", "optim.lrr=1"], "optim.lrr")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    fails(["name=e", f"out_dir={blocker}/runs"], "not writable")
    fails(["name=f", "data.train_shards=/nonexistent/shards", "data.val_shards=/x",
           "data.tokenizer=/x"], "/nonexistent")  # fmt: skip
    given = small_data  # 512-token shards, given explicitly
    fails(["name=g", "model.vocab_size=384", f"data.tokenizer={given / 'tokenizer.json'}",
           f"data.train_shards={given / 'train'}", f"data.val_shards={given / 'val'}"],
          "384")  # fmt: skip
    assert not (runs / "b").exists() and not (runs / "c").exists()


def test_existing_run_needs_resume(small_overrides):
    cfg = load_config("tiny", [*small_overrides, "name=twice", "train.steps=2"])
    train(cfg, quiet=True)
    with pytest.raises(ConfigError, match="--resume"):
        train(cfg, quiet=True)


def test_mixture_with_stages_trains_and_accounts(small_overrides, small_data):
    given = small_data
    mixture = [
        f"data.tokenizer={given / 'tokenizer.json'}",
        f"data.val_shards={given / 'val'}",
        f"data.sources={{web: '{given / 'train'}', code: '{given / 'val'}'}}",
        "data.stages=[{name: stable, steps: 4, weights: {web: 3, code: 1}},"
        " {name: decay, weights: {web: 1, code: 1}}]",
    ]
    cfg = load_config("tiny", [*small_overrides, *mixture, "name=mix", "train.steps=6"])
    train(cfg, quiet=True)
    plan = json.loads((cfg.run_dir / "mixture.json").read_text())
    share = {(r["stage"], r["source"]): r["share"] for r in plan}
    assert share[("stable", "web")] == pytest.approx(0.75)
    assert share[("decay", "code")] == pytest.approx(0.5)
    events = [json.loads(x) for x in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    stages = [(e["step"], e["stage"]) for e in events if e["event"] == "stage"]
    assert stages == [(0, "stable"), (4, "decay")]


def test_mixture_config_errors():
    with pytest.raises(ConfigError, match="unknown sources"):
        load_config("tiny", ["data.sources={a: x}", "data.stages=[{name: s, weights: {b: 1}}]"])
    with pytest.raises(ConfigError, match="both data.sources and data.stages"):
        load_config("tiny", ["data.sources={a: x}"])


def test_init_from_continues_a_run_exactly_and_forks_with_other_data(small_overrides, small_data):
    common = [*small_overrides, "train.steps=6", "train.log_every=1", "train.val_every=0",
              "checkpoint.every=4", "train.dtype=fp32", "schedule.kind=wsd",
              "schedule.warmup_steps=1", "schedule.decay_fraction=0.5"]  # fmt: skip
    a = load_config("tiny", [*common, "name=a"])
    train(a, quiet=True)
    fork = a.run_dir / "checkpoints" / "step_000004"
    b = load_config("tiny", [*common, "name=b", f"checkpoint.init_from={fork}"])
    train(b, quiet=True)
    wa = load_file(str(a.run_dir / "checkpoints/step_000006/model.safetensors"))
    wb = load_file(str(b.run_dir / "checkpoints/step_000006/model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k  # same config from the same state: bitwise equal

    def events(run):
        return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]

    lr_a = {e["step"]: e["lr"] for e in events(a.run_dir) if e["event"] == "train"}
    lr_b = {e["step"]: e["lr"] for e in events(b.run_dir) if e["event"] == "train"}
    assert lr_b == {5: lr_a[5], 6: lr_a[6]}  # the schedule continues

    given = small_data
    mixture = [
        f"data.tokenizer={given / 'tokenizer.json'}",
        f"data.val_shards={given / 'val'}",
        f"data.sources={{web: '{given / 'train'}', code: '{given / 'val'}'}}",
        "data.stages=[{name: stable, steps: 4, weights: {web: 1}},"
        " {name: decay, weights: {web: 1, code: 1}}]",
    ]
    c = load_config("tiny", [*common, *mixture, "name=c", f"checkpoint.init_from={fork}"])
    result = train(c, quiet=True)
    ev = events(c.run_dir)
    assert ev[0]["event"] == "init_from" and ev[0]["step"] == 4
    assert [e["step"] for e in ev if e["event"] == "train"] == [5, 6]
    assert [(e["step"], e["stage"]) for e in ev if e["event"] == "stage"] == [(4, "decay")]
    assert result.step == 6 and (c.run_dir / "summary.json").is_file()
    # Resumable: with its own checkpoints, --resume wins over init_from.
    assert train(c, resume=True, quiet=True).step == 6


def test_stop_at_and_init_from_errors(small_overrides):
    common = [*small_overrides, "train.steps=4", "train.val_every=0", "checkpoint.every=0"]
    trunk = load_config("tiny", [*common, "name=trunk", "train.stop_at=2"])
    result = train(trunk, quiet=True)
    assert result.step == 2 and result.val is None
    assert not (trunk.run_dir / "summary.json").exists()
    assert json.loads((trunk.run_dir / "stopped.json").read_text())["step"] == 2
    assert [s for s, _ in list_checkpoints(trunk.run_dir / "checkpoints")] == [2]
    with pytest.raises(ConfigError, match="after train.steps"):
        load_config("tiny", [*common, "train.stop_at=5"])
    bad = trunk.run_dir / "checkpoints" / "step_000009"
    with pytest.raises(ConfigError, match="no such checkpoint"):
        train(load_config("tiny", [*common, "name=x", f"checkpoint.init_from={bad}"]), quiet=True)
    bad.mkdir()
    with pytest.raises(ConfigError, match="incomplete checkpoint"):
        train(load_config("tiny", [*common, "name=y", f"checkpoint.init_from={bad}"]), quiet=True)
    good = trunk.run_dir / "checkpoints" / "step_000002"
    late = load_config(
        "tiny", [*common, "name=z", "train.stop_at=2", f"checkpoint.init_from={good}"]
    )
    with pytest.raises(ConfigError, match="nothing to train"):
        train(late, quiet=True)
    assert not (late.run_dir).exists()


def test_mixture_of_embedded_code_and_prose(small_overrides):
    sources = [
        "data.sources={code: 'stdlib:code', prose: 'stdlib:prose'}",
        "data.stages=[{name: all, weights: {code: 1, prose: 3}}]",
        "name=embedded-mix",
        "train.steps=3",
    ]
    cfg = load_config("tiny", [*small_overrides, *sources])
    train(cfg, quiet=True)
    plan = json.loads((cfg.run_dir / "mixture.json").read_text())
    assert {r["source"]: r["share"] for r in plan} == pytest.approx({"code": 0.25, "prose": 0.75})
    bad = load_config("tiny", [*small_overrides, "data.sources={x: 'stdlib:poetry'}",
                               "data.stages=[{name: s, weights: {x: 1}}]", "name=bad"])  # fmt: skip
    with pytest.raises(ValueError, match="stdlib:code"):
        train(bad, quiet=True)
