"""The planner's commands, through argparse as `crucible` wires them."""

import argparse

import pytest

from crucible.plan.commands import register
from crucible.plan.compass import Brief, decide
from crucible.plan.hardware import ACCELERATORS, UnknownAcceleratorError
from crucible.plan.memory import LayoutError


def run(argv):
    parser = argparse.ArgumentParser(prog="crucible")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_plan_prints_every_section(capsys):
    assert run(["plan", "llama3.2-1b-ablation", "--gpus", "8", "--price", "2", "--search"]) == 0
    out = capsys.readouterr().out
    assert "1,235,814,400" in out
    for section in ("FLOPs per token", "Memory per GPU", "GPU-hours", "tokens per parameter"):
        assert section in out
    assert "H100 SXM dense bf16 989.4" in out and "Parallel layouts" in out


def test_plan_errors(capsys):
    with pytest.raises(UnknownAcceleratorError, match="H100 SXM"):
        run(["plan", "tiny", "--gpu", "H9000"])
    with pytest.raises(LayoutError, match="num_heads"):
        run(["plan", "tiny", "--gpus", "3", "--tp", "3"])
    with pytest.raises(ValueError, match="--gpus is 8"):
        run(["plan", "tiny", "--gpus", "8", "--dp", "3"])


def test_hardware_and_roofline(capsys):
    run(["hardware"])
    out = capsys.readouterr().out
    assert all(a.name in out for a in ACCELERATORS)
    run(["roofline", "tiny", "--gpu", "a100"])
    assert "memory-bound" in capsys.readouterr().out


def test_compass(tmp_path, capsys):
    assert "Do not pretrain" in decide(Brief(fine_tuning_works=True))
    brief = tmp_path / "brief.yaml"
    brief.write_text("purpose: open-source\ntarget: laptop\nlanguages: [en, zh]\ngpu: h100\n")
    run(["compass", "--brief", str(brief)])
    out = capsys.readouterr().out
    assert "recommended" in out and "multilingual" in out and "161k" in out
    brief.write_text("gpu: TPU\n")
    with pytest.raises(UnknownAcceleratorError):
        run(["compass", "--brief", str(brief)])
