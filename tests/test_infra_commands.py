"""`crucible bench ...` and `crucible doctor` through their argparse registration."""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from crucible.infra import storage
from crucible.infra.commands import register

ROOT = Path(__file__).resolve().parents[1]


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="crucible")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_bench_matmul_json_against_a_named_card(tmp_path, capsys):
    out = tmp_path / "m.json"
    argv = ["bench", "matmul", "--cpu", "--size", "32", "--min-time", "0.01", "--gpu", "h100"]
    assert run([*argv, "--dtypes", "bf16", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    (row,) = data["tables"][0]["rows"]
    assert row["kernel"] == "matmul bf16" and row["table peak"] == 989.4
    assert "| matmul bf16 |" in capsys.readouterr().out


def test_bench_storage_with_a_fresh_file_deletes_it(tmp_path, capsys):
    out = tmp_path / "s.json"
    data_dir = tmp_path / "d"
    data_dir.mkdir()
    assert run(["bench", "storage", str(data_dir), "--size", "1M", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["tables"][0]["rows"]
    assert [r["bytes"] for r in rows] == [1 << 20, 1 << 20] and rows[1]["MB/s"] > 0
    assert list(data_dir.iterdir()) == []
    assert "page cache" in capsys.readouterr().out


def test_bench_loader(tmp_path, capsys):
    np.arange(5000, dtype=np.uint16).tofile(tmp_path / "x.ds")
    argv = ["bench", "loader", str(tmp_path), "--seq-len", "32", "--batch", "2"]
    assert run([*argv, "--min-time", "0.02"]) == 0
    assert "tokens/s" in capsys.readouterr().out


def test_doctor_exit_code_follows_the_checks(tmp_path, monkeypatch, capsys):
    out = tmp_path / "d.json"
    assert run(["doctor", "--no-measure", "--storage", str(tmp_path), "--json", str(out)]) == 0
    assert json.loads(out.read_text())["ok"] is True
    bad = storage.RoundTrip(10, 0.1, 0.1, 2, ["model.0.bias"])
    monkeypatch.setattr(storage, "checkpoint_roundtrip", lambda root: bad)
    assert run(["doctor", "--no-measure", "--storage", str(tmp_path)]) == 1
    assert "SOME CHECKS FAILED" in capsys.readouterr().out


def test_collectives_under_torchrun(tmp_path):
    # What `torchrun --nproc_per_node 2 -m crucible bench collectives` runs, before cli.py wires it.
    script = tmp_path / "entry.py"
    script.write_text(
        "import argparse, sys\n"
        "from crucible.infra.commands import register\n"
        "p = argparse.ArgumentParser(); register(p.add_subparsers(dest='command'))\n"
        "a = p.parse_args(sys.argv[1:]); sys.exit(a.func(a))\n"
    )
    out = tmp_path / "c.json"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(script),
        "bench",
        "collectives",
        "--sizes",
        "16K",
        "--iters",
        "2",
        "--ops",
        "all_reduce,all_gather",
        "--json",
        str(out),
    ]
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["tables"][0]["rows"]
    assert [(r["op"], r["ranks"], r["wrong"]) for r in rows] == [
        ("all_reduce", 2, 0),
        ("all_gather", 2, 0),
    ]
    assert proc.stdout.count("## Collectives") == 1  # rank 0 prints, rank 1 does not
