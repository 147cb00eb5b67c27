"""The marathon guards: numerics, spikes (skip / rollback / cooldown), signals, supervisor,
resume checks, exit codes. Faults are injected through the config (`faults:`)."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from crucible.config import ConfigError, load_config
from crucible.train.checkpoint import list_checkpoints
from crucible.train.errors import EXIT_PREEMPTED, Diverged
from crucible.train.trainer import train

FAST = ["train.val_every=0", "train.dtype=fp32", "train.threads=1", "monitor.every=0"]


def _events(run_dir: Path, kind: str | None = None) -> list[dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if kind is None or r["event"] == kind]


def _weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / f"checkpoints/step_{step:06d}/model.safetensors"))


def _assert_equal_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _cli(args: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "crucible", *args], capture_output=True, text=True, **kw
    )


# ----------------------------------------------------------------------------- detection

FAULTS = [(100, "nan_loss"), (130, "poison_batch"), (160, "lr_spike"), (200, "nan_loss"),
          (230, "poison_batch"), (260, "lr_spike"), (300, "nan_loss"), (320, "poison_batch"),
          (350, "lr_spike"), (380, "nan_loss")]  # fmt: skip


@pytest.mark.slow
def test_injected_faults_are_all_detected_and_recovered(small_overrides):
    """10/10 injected faults detected (at their step, or the next for an LR spike whose
    damage shows a step later) and recovered; the final loss ends close to a clean run's."""
    common = [*small_overrides, *FAST, "train.steps=420", "train.log_every=10",
              "checkpoint.every=20", "checkpoint.keep_last=3", "spikes.max_rollbacks=10"]  # fmt: skip
    clean = load_config("tiny", [*common, "name=clean"])
    train(clean, quiet=True)
    spec = "[" + ", ".join(f"{{step: {s}, kind: {k}}}" for s, k in FAULTS) + "]"
    faulty = load_config("tiny", [*common, "name=faulty", f"faults={spec}"])
    result = train(faulty, quiet=True)
    assert result.step == 420
    incidents = _events(faulty.run_dir, "incident")
    hit = {r["step"] for r in incidents if r["kind"] != "rollback"}
    for step, kind in FAULTS:
        lag = 1 if kind == "lr_spike" else 0
        assert step + lag in hit, (step, kind, sorted(hit))
    clean_loss = _events(clean.run_dir, "train")[-1]["loss"]
    faulty_loss = _events(faulty.run_dir, "train")[-1]["loss"]
    assert abs(faulty_loss - clean_loss) / clean_loss < 0.03, (faulty_loss, clean_loss)
    # Nothing written while an incident was open is non-finite, and the run directory is whole.
    for _, ckpt in list_checkpoints(faulty.run_dir / "checkpoints"):
        for t in load_file(str(ckpt / "model.safetensors")).values():
            assert torch.isfinite(t).all()


@pytest.mark.slow
def test_clean_run_raises_no_alarm(small_overrides):
    cfg = load_config("tiny", [*small_overrides, *FAST, "name=clean1000", "train.steps=1000",
                               "train.log_every=50", "checkpoint.every=0",
                               "monitor.every=100"])  # fmt: skip
    train(cfg, quiet=True)
    assert _events(cfg.run_dir, "incident") == []
    assert _events(cfg.run_dir, "alert") == []
    detail = _events(cfg.run_dir, "monitor_detail")
    assert [r["step"] for r in detail] == list(range(100, 1001, 100))
    keys = detail[-1].keys()
    for prefix in ("grad_norm/", "param_rms/", "update_ratio/", "act_rms/", "max_attn_logit/"):
        assert any(k.startswith(prefix + "layer00") for k in keys), prefix


def test_nonfinite_steps_change_nothing_and_escalate(small_overrides):
    """A NaN step leaves weights and optimizer state untouched; a streak without any checkpoint
    to return to stops the run with one clear reason, and nothing non-finite is saved."""
    common = [*small_overrides, *FAST, "train.steps=6", "train.log_every=1", "checkpoint.every=0"]
    a = load_config("tiny", [*common, "name=a", "train.stop_at=3"])
    train(a, quiet=True)
    b = load_config(
        "tiny", [*common, "name=b", "train.stop_at=4", "faults=[{step: 4, kind: nan_loss}]"]
    )
    train(b, quiet=True)
    # step 4 skipped: b's weights at step 4 are a's at step 3, exactly (Adam state too)
    _assert_equal_weights(_weights(a.run_dir, 3), _weights(b.run_dir, 4))
    opt_a = load_file(str(a.run_dir / "checkpoints/step_000003/optimizer.safetensors"))
    opt_b = load_file(str(b.run_dir / "checkpoints/step_000004/optimizer.safetensors"))
    _assert_equal_weights(opt_a, opt_b)
    streak = "[" + ", ".join(f"{{step: {s}, kind: nan_loss}}" for s in range(2, 6)) + "]"
    c = load_config("tiny", [*common, "name=c", "spikes.escalate_after=3", f"faults={streak}"])
    with pytest.raises(Diverged, match="no checkpoint before step 1"):
        train(c, quiet=True)
    assert list_checkpoints(c.run_dir / "checkpoints") == []
    kinds = [(r["step"], r["kind"], r["action"]) for r in _events(c.run_dir, "incident")]
    assert kinds == [
        (2, "nonfinite", "skip"),
        (3, "nonfinite", "skip"),
        (4, "nonfinite", "rollback"),
    ]


def test_policy_options_are_validated():
    with pytest.raises(ConfigError, match="spikes.policy"):
        load_config("tiny", ["spikes.policy=restart"])
    with pytest.raises(ConfigError, match="min_history"):
        load_config("tiny", ["spikes.window=16", "spikes.min_history=32"])
    with pytest.raises(ConfigError, match="after train.steps"):
        load_config("tiny", ["train.steps=10", "faults=[{step: 11, kind: nan_loss}]"])
    with pytest.raises(ConfigError, match="cooldown_factor"):
        load_config("tiny", ["spikes.cooldown_factor=2"])


def test_lr_cooldown_lowers_the_learning_rate_for_a_window(small_overrides):
    from crucible.train.schedule import lr_at

    cfg = load_config("tiny", [*small_overrides, *FAST, "name=cool", "train.steps=110",
                               "train.log_every=1", "checkpoint.every=0", "spikes.policy=lr_cooldown",
                               "spikes.cooldown_steps=5", "spikes.cooldown_factor=0.1",
                               "faults=[{step: 100, kind: poison_batch}]"])  # fmt: skip
    train(cfg, quiet=True)
    lr = {r["step"]: r["lr"] for r in _events(cfg.run_dir, "train")}
    inc = _events(cfg.run_dir, "incident")
    assert [(r["step"], r["action"]) for r in inc] == [(100, "lr_cooldown")]

    def scheduled(step):
        return lr_at(step - 1, cfg.train.steps, cfg.optim.lr, cfg.schedule)

    assert lr[99] == pytest.approx(scheduled(99))
    assert [lr[s] for s in range(101, 106)] == pytest.approx(
        [scheduled(s) * 0.1 for s in range(101, 106)]
    )
    assert lr[107] == pytest.approx(scheduled(107))


# ----------------------------------------------------------------------------- rollback


def _wait_for(run_dir: Path, pred, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else "exited early"
        try:
            if pred(_events(run_dir)):
                return
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        time.sleep(0.02)
    raise TimeoutError("condition never met")


@pytest.mark.slow
def test_resume_after_rollback_is_bitwise_equal(small_overrides, tmp_path):
    common = ["tiny", *small_overrides, *FAST, "train.steps=60", "train.log_every=1",
              "checkpoint.every=10", "checkpoint.keep_last=3", "spikes.policy=rollback",
              "spikes.rollback_skip_batches=3", "spikes.min_history=16",
              "faults=[{step: 35, kind: poison_batch}]"]  # fmt: skip
    ref = _cli(["train", *common, "name=ref"])
    assert ref.returncode == 0, ref.stderr
    ref_dir = tmp_path / "runs" / "ref"
    rollbacks = [r for r in _events(ref_dir, "incident") if r["kind"] == "rollback"]
    assert [(r["from_step"], r["to_step"], r["skip_batches"]) for r in rollbacks] == [(35, 30, 3)]
    assert json.loads((ref_dir / "decisions.json").read_text()) == [
        {"at_step": 35, "to_step": 30, "skip_batches": 3}
    ]
    cmd = [sys.executable, "-m", "crucible", "train", *common, "name=killed"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    run_dir = tmp_path / "runs" / "killed"
    # killed after the rollback, before the next checkpoint: the resume starts before the
    # rollback and must replay it
    _wait_for(run_dir, lambda ev: any(e["event"] == "train" and e["step"] == 33 and
                                      any(x["kind"] == "rollback" for x in ev
                                          if x["event"] == "incident") for e in ev), proc)  # fmt: skip
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = _cli(["train", *common, "name=killed", "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert "(replayed)" in resumed.stdout
    _assert_equal_weights(_weights(ref_dir, 60), _weights(run_dir, 60))
    steps = [r["step"] for r in _events(run_dir, "train")]
    assert steps == list(range(1, 61))


# ----------------------------------------------------------------------------- signals


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_75(small_overrides, tmp_path):
    common = ["tiny", *small_overrides, *FAST, "train.steps=30", "train.log_every=1",
              "checkpoint.every=100"]  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "crucible", "train", *common, "name=pre"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    run_dir = tmp_path / "runs" / "pre"
    _wait_for(run_dir, lambda ev: any(e["event"] == "train" and e["step"] >= 5 for e in ev), proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_PREEMPTED, err
    assert "--resume" in err and "Traceback" not in err
    saved = [s for s, _ in list_checkpoints(run_dir / "checkpoints")]
    assert len(saved) == 1 and saved[0] >= 5
    assert _cli(["train", *common, "name=pre", "--resume"]).returncode == 0
    ref = _cli(["train", *common, "name=ref"])
    assert ref.returncode == 0
    _assert_equal_weights(_weights(tmp_path / "runs/ref", 30), _weights(run_dir, 30))


# ----------------------------------------------------------------------------- resume checks


def test_resume_refuses_changed_shape_or_earlier_stop_before_touching_the_run(small_overrides):
    common = [*small_overrides, *FAST, "name=r", "train.steps=6", "checkpoint.every=3"]
    cfg = load_config("tiny", common)
    train(cfg, quiet=True)
    before = {p: p.read_bytes() for p in cfg.run_dir.rglob("*") if p.is_file()}
    bad = [
        (["model.num_layers=3"], "model"),
        (["train.global_batch_size=16"], "train.global_batch_size"),
        (["train.stop_at=3", "train.steps=8"], "train.stop_at 3 is before"),
        (["train.steps=4"], "train.steps 4 is before"),
    ]
    for extra, message in bad:
        with pytest.raises(ConfigError, match=message):
            train(load_config("tiny", [*common, *extra]), resume=True, quiet=True)
    after = {p: p.read_bytes() for p in cfg.run_dir.rglob("*") if p.is_file()}
    assert after == before  # config.yaml and summary.json untouched


def test_killed_before_first_checkpoint_logs_each_step_once(small_overrides):
    common = [*small_overrides, *FAST, "name=early", "train.steps=5", "train.log_every=1",
              "checkpoint.every=0"]  # fmt: skip
    crash = load_config("tiny", [*common, "faults=[{step: 3, kind: crash}]"])
    with pytest.raises(RuntimeError, match="injected crash"):
        train(crash, quiet=True)
    assert [r["step"] for r in _events(crash.run_dir, "train")] == [1, 2]
    train(load_config("tiny", common), resume=True, quiet=True)
    assert [r["step"] for r in _events(crash.run_dir, "train")] == [1, 2, 3, 4, 5]


def test_logged_loss_is_cross_entropy_with_z_loss_beside(small_overrides):
    cfg = load_config("tiny", [*small_overrides, *FAST, "name=z", "train.steps=1",
                               "train.log_every=1", "model.z_loss=0.01"])  # fmt: skip
    train(cfg, quiet=True)
    row = _events(cfg.run_dir, "train")[0]
    # Independently: the initial model (same seed) on the first step's batches.
    from crucible.data.prepare import prepare_data
    from crucible.model import Transformer
    from crucible.train.trainer import make_loader

    data = prepare_data(cfg.data, cfg.model.vocab_size, cfg.train.seq_len, quiet=True)
    torch.manual_seed(cfg.seed)
    model = Transformer(cfg.model)
    ces, zs = [], []
    with torch.no_grad():
        for batch in make_loader(cfg, data, 0, 1, None).next_step():
            logits = model(batch.tokens).logits
            ces.append(F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten()))
            zs.append(torch.logsumexp(logits, -1).square().mean())
    assert row["loss"] == pytest.approx(float(torch.stack(ces).mean()), rel=1e-5)
    assert row["z_loss"] == pytest.approx(float(torch.stack(zs).mean()), rel=1e-4)


# ----------------------------------------------------------------------------- CLI


def test_internal_error_prints_traceback_and_exits_1(small_overrides):
    out = _cli(["train", "tiny", *small_overrides, *FAST, "name=bug", "train.steps=3",
                "faults=[{step: 2, kind: crash}]"])  # fmt: skip
    assert out.returncode == 1
    assert "Traceback" in out.stderr and "injected crash" in out.stderr
    user = _cli(["train", "tiny", *small_overrides, "optim.lrr=1"])
    assert user.returncode == 2 and "Traceback" not in user.stderr


def test_quickstart_never_deletes_a_directory_it_did_not_create(tmp_path):
    from crucible.quickstart import quickstart

    mine = tmp_path / "runs" / "mine"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("precious")
    with pytest.raises(ConfigError, match="not made by the quickstart"):
        quickstart(["name=mine"], out_dir=str(tmp_path / "runs"))
    assert (mine / "notes.txt").read_text() == "precious"


@pytest.mark.slow
@pytest.mark.dist
def test_failing_rank_ends_every_rank_within_seconds(small_overrides):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "crucible", "train", "tiny", *small_overrides, *FAST, "name=dist-crash",
           "train.steps=5", "faults=[{step: 2, kind: crash, rank: 1}]"]  # fmt: skip
    t0 = time.time()
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert "injected crash at step 2 on rank 1" in out.stderr
    assert "Traceback" in out.stderr
    assert time.time() - t0 < 90  # startup included; the collective timeout is 30 minutes


# ----------------------------------------------------------------------------- chaos


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except FileNotFoundError:
        return []
    return [int(x) for x in text.split()]


@pytest.mark.slow
def test_supervisor_survives_20_random_kills_bitwise(small_overrides, tmp_path):
    """20 SIGKILLs under --supervise: 5 at chosen moments (before the first checkpoint, inside
    a save, inside a prune) and 15 at random moments. The final weights equal an uninterrupted
    run's, bit for bit, and metrics.jsonl has every step exactly once."""
    import random

    steps = 600  # long enough that 15 random kills land before it finishes, even when idle
    common = ["tiny", *small_overrides, *FAST, f"train.steps={steps}", "train.log_every=1",
              "checkpoint.every=4", "checkpoint.keep_last=2"]  # fmt: skip
    ref = _cli(["train", *common, "name=ref"])
    assert ref.returncode == 0, ref.stderr
    chaos = tmp_path / "chaos"
    chaos.write_text("step@2 save prune save prune")
    env = {**os.environ, "CRUCIBLE_CHAOS_FILE": str(chaos)}
    log = tmp_path / "supervisor.log"

    def restarts() -> int:
        return len(re.findall(r"\(signal SIGKILL\); restart \d+/", log.read_text()))

    rng = random.Random(0)
    killed: set[int] = set()
    with log.open("w") as err_file:
        sup = subprocess.Popen(
            [sys.executable, "-m", "crucible", "train", *common, "name=chaos", "--supervise",
             "--max-restarts=40", "--backoff=0"],
            stdout=subprocess.DEVNULL, stderr=err_file, text=True, env=env,
        )  # fmt: skip
        while sup.poll() is None and restarts() < 20:
            time.sleep(rng.uniform(0.3, 2.5))
            kids = [k for k in _children(sup.pid) if k not in killed]
            if kids and restarts() + len(chaos.read_text().split()) < 20:
                os.kill(kids[0], signal.SIGKILL)
                killed.add(kids[0])
        sup.wait(timeout=600)
    err = log.read_text()
    assert sup.returncode == 0, err[-3000:]
    assert chaos.read_text().split() == []  # every chosen kill happened
    # 20 SIGKILL restarts, 5 of them chosen: 15 random (a random kill may land on a child that
    # was already dying from a chosen one, so a kill or two more may have been sent)
    assert restarts() == 20 and len(killed) >= 15, (restarts(), len(killed))
    run_dir = tmp_path / "runs" / "chaos"
    _assert_equal_weights(_weights(tmp_path / "runs/ref", steps), _weights(run_dir, steps))
    logged = [r["step"] for r in _events(run_dir, "train")]
    assert logged == list(range(1, steps + 1))


# ----------------------------------------------------------------------------- monitoring


def test_throughput_drop_alert_names_the_data_loader(small_overrides):
    """A loader that suddenly waits raises one alert whose probable cause is data loading."""
    from crucible.train.callbacks.monitoring import MonitorCallback
    from crucible.train.state import StepResult

    cfg = load_config("tiny", [*small_overrides, "train.log_every=1"])
    logged: list[tuple[str, dict]] = []

    class FakeRun:
        def __init__(self):
            self.cfg, self.tokens_per_step = cfg, 512
            self.device = torch.device("cpu")
            self.model = torch.nn.Linear(1, 1)  # dense: no expert statistics

        def log(self, event, step, **values):
            logged.append((event, values))

        def say(self, *a, **k):
            pass

    run = FakeRun()
    mon = MonitorCallback(run)
    for step in range(1, 40):
        slow = step >= 30
        res = StepResult(step=step, lr=1e-3, loss=3.0, z_loss=1.0, grad_norm=1.0,
                         data_seconds=0.5 if slow else 0.001, compute_seconds=0.01)  # fmt: skip
        mon.on_step_end(run, res)
    alerts = [v for e, v in logged if e == "alert"]
    assert len(alerts) == 1 and alerts[0]["kind"] == "throughput_drop"
    assert alerts[0]["cause"].startswith("data loading")


def test_tensorboard_scalars_after_the_resume_step_are_superseded(small_overrides):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    common = [*small_overrides, *FAST, "name=tb", "train.tensorboard=true", "train.log_every=1",
              "checkpoint.every=3"]  # fmt: skip
    with pytest.raises(RuntimeError):
        train(load_config("tiny", [*common, "train.steps=6", "faults=[{step: 5, kind: crash}]"]),
              quiet=True)  # fmt: skip
    train(load_config("tiny", [*common, "train.steps=6"]), resume=True, quiet=True)
    acc = EventAccumulator(str(tmp_tb := Path(load_config("tiny", common).run_dir / "tensorboard")))
    acc.Reload()
    steps = [e.step for e in acc.Scalars("train/loss")]
    assert steps == [1, 2, 3, 4, 5, 6], (steps, tmp_tb)
