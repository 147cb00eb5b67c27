"""Preflight: each check passes a sound run and catches the fault it exists for."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from crucible.cli import main
from crucible.config import ConfigError, load_config
from crucible.data.prepare import PreparedData, prepare_data
from crucible.plan.memory import Layout, estimate_memory
from crucible.pretrain import preflight
from crucible.train import preflight as P
from crucible.train import preflight_full
from crucible.train.setup import make_loader
from crucible.train.trainer import train

FAST = ["train.steps=20", "schedule.warmup_steps=2", "train.val_every=0", "train.dtype=fp32",
        "train.threads=1", "checkpoint.every=0"]  # fmt: skip


def _cfg(small_overrides, *extra):
    return load_config("tiny", [*small_overrides, *FAST, *extra])


def _data(cfg) -> PreparedData:
    return prepare_data(cfg.data, cfg.model.vocab_size, cfg.train.seq_len, quiet=True)


def _status(checks) -> dict[str, str]:
    return {c.name: c.status for c in checks}


def test_config_arithmetic(small_overrides):
    ok = _cfg(small_overrides)
    assert P.check_batch(ok, 1).status == "pass" and "accum 2" in P.check_batch(ok, 1).detail
    bad = P.check_batch(ok, 3)  # 8 sequences do not split over micro 4 x 3 ranks
    assert bad.status == "fail" and "global_batch_size 8" in bad.detail
    assert P.check_schedule(ok).status == "pass"
    assert P.check_seq_len(ok).status == "pass"
    raised = P.check_schedule(_cfg(small_overrides, "schedule.min_lr=0.1"))
    assert raised.status == "fail" and "min_lr" in raised.detail
    long_warmup = P.check_schedule(_cfg(small_overrides, "schedule.warmup_steps=50"))
    assert long_warmup.status == "warn" and "never reaches" in long_warmup.detail
    flat = P.check_schedule(_cfg(small_overrides, "schedule.min_lr=3e-3", "optim.lr=3e-3"))
    assert flat.status == "warn" and "never decays" in flat.detail
    too_long = ok.model_copy(update={"train": ok.train.model_copy(update={"seq_len": 65})})
    assert P.check_seq_len(too_long).status == "fail"  # the config validator refuses it too


def test_data_checks(small_overrides, small_data, tmp_path):
    cfg = _cfg(small_overrides)
    data = _data(cfg)
    assert P.check_data(cfg, data).status == "pass"
    # Shards whose end-of-text id is not the tokenizer's: tokenized by another tokenizer.
    other = tmp_path / "train"
    shutil.copytree(data.train_dir, other)
    meta = json.loads((other / "dataset.json").read_text())
    meta["eos_id"] = meta["eos_id"] + 1
    (other / "dataset.json").write_text(json.dumps(meta))
    bad = P.check_data(cfg, PreparedData(data.tokenizer_path, other, data.val_dir))
    assert bad.status == "fail" and "another tokenizer" in bad.detail
    # Tokens planned against tokens available (epochs).
    loader = make_loader(cfg, data, 0, 1, None)
    planned = P.check_tokens(cfg, loader)
    epochs = 20 * 8 / loader.n_chunks
    assert planned.status == "pass" and f"train {epochs:.2f}" in planned.detail
    many = _cfg(small_overrides, "train.steps=5000")
    assert P.check_tokens(many, loader).status == "warn"  # > 4 epochs


def test_memory_fit(small_overrides, monkeypatch):
    cfg = _cfg(small_overrides)
    cpu = torch.device("cpu")
    assert P.check_memory(cfg, 1, cpu).status == "pass"
    big = load_config("tiny", ["model.hidden_size=8192", "model.num_layers=64",
                               "model.num_heads=64", "model.num_kv_heads=8",
                               "model.intermediate_size=28672"])  # fmt: skip
    huge = P.check_memory(big, 1, cpu)  # ~50B parameters: several hundred GiB of state
    assert huge.status == "fail" and "does not fit" in huge.detail
    layout = Layout(dp=1, zero=0, micro_batch=4, seq_len=64, grad_accum=2)
    peak = estimate_memory(cfg.model, layout, precision="autocast").peak
    for have, expected in ((2 * peak, "pass"), (1.1 * peak, "warn"), (0.9 * peak, "fail")):
        monkeypatch.setattr(P, "available_memory", lambda device, h=have: (h, h, "test"))
        assert P.check_memory(cfg, 1, cpu).status == expected


def test_full_preflight_passes_and_the_round_trip_catches_a_broken_load(
    small_overrides, monkeypatch
):
    cfg = _cfg(small_overrides, "eval.every=5", "eval.tasks=[arithmetic]", "eval.subset=4")
    checks, info = preflight(cfg, full=True)
    assert not info.enabled
    status = _status(checks)
    assert set(status.values()) == {"pass"}, checks
    assert {"throughput", "checkpoint round trip", "eval tasks", "memory"} <= set(status)
    assert not any(p.name.startswith(".preflight") for p in Path(cfg.out_dir).iterdir())
    # A load that restores nothing is caught.
    monkeypatch.setattr(preflight_full.ckpt, "load_checkpoint", lambda *a, **k: {})
    checks, _ = preflight(cfg, full=True)
    trip = next(c for c in checks if c.name == "checkpoint round trip")
    assert trip.status == "fail" and "differ" in trip.detail


def test_eval_tasks_that_do_not_load_fail(small_overrides):
    from crucible.pretrain import eval_tasks_check

    cfg = _cfg(small_overrides, "eval.every=5", "eval.tasks=[arithmetic,no_such_task]")
    check = eval_tasks_check(cfg)
    assert check.status == "fail" and "no_such_task" in check.detail


def test_cli_table_and_exit_codes(small_overrides, capsys):
    with pytest.raises(SystemExit) as e:
        main(["preflight", "tiny", *small_overrides, *FAST])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "learning rate" in out and "memory" in out and "fail" not in out
    with pytest.raises(SystemExit) as e:
        main(["preflight", "tiny", *small_overrides, *FAST, "schedule.min_lr=1"])
    assert e.value.code == 2
    captured = capsys.readouterr()
    assert "fail" in captured.out and "1 check(s) failed: learning rate" in captured.err
    with pytest.raises(SystemExit) as e:  # data that prepare_data refuses: a row, not a crash
        main(["preflight", "tiny", *small_overrides, *FAST, "data.tokenizer=/nonexistent/t.json"])
    assert e.value.code == 2
    captured = capsys.readouterr()
    assert "/nonexistent/t.json" in captured.out and "tokenizer and shards" in captured.err


def test_train_runs_the_fast_checks_before_touching_the_run(small_overrides):
    cfg = _cfg(small_overrides, "schedule.min_lr=1", "name=refused")
    with pytest.raises(ConfigError, match="preflight failed: learning rate"):
        train(cfg, quiet=True)
    assert not cfg.run_dir.exists()


_RANKS_SCRIPT = """
import json, os, sys
import torch
from crucible.config import load_config
from crucible.model import Transformer
from crucible.train import preflight, setup
from crucible.train.distributed import finish
from crucible.train.preflight_full import run_preflight

cfg = load_config("tiny", sys.argv[2:])
out = {}
checks, info = run_preflight(cfg, full=True)
out["sound"] = {c.name: c.status for c in checks}
rank = info.rank

def per_rank_seed(cfg, device):  # the SmolLM3 bug: a seed that depends on the rank
    torch.manual_seed(cfg.seed + rank)
    return Transformer(cfg.model)

setup.init_model = per_rank_seed
checks, _ = run_preflight(cfg, full=True)
out["per_rank_seed"] = {c.name: [c.status, c.detail] for c in checks}
real = preflight.make_loader
preflight.make_loader = lambda cfg, data, rank, world, eos: real(cfg, data, 0, world, eos)
checks, _ = run_preflight(cfg)
out["same_data"] = {c.name: [c.status, c.detail] for c in checks}
if rank == 0:
    with open(sys.argv[1], "w") as f:
        json.dump(out, f)
finish(0)
"""


@pytest.mark.slow
@pytest.mark.dist
def test_ranks_share_weights_and_not_data(small_overrides, tmp_path):
    """Two gloo ranks: a sound FSDP2 run passes every check; a per-rank seed and a loader
    that ignores the rank are each caught."""
    script, result = tmp_path / "ranks.py", tmp_path / "ranks.json"
    script.write_text(_RANKS_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(script), str(result), *small_overrides, *FAST, "distributed.strategy=fsdp",
           "train.micro_batch_size=2"]  # fmt: skip
    root = str(Path(__file__).parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    got = json.loads(result.read_text())
    assert set(got["sound"].values()) == {"pass"}, got["sound"]
    assert {"ranks: data order", "ranks: initial weights"} <= set(got["sound"])
    status, detail = got["per_rank_seed"]["ranks: initial weights"]
    assert status == "fail" and "rank(s) [1]" in detail
    status, detail = got["same_data"]["ranks: data order"]
    assert status == "fail" and "same first micro-batch" in detail
