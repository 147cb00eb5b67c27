"""bench/cpu_speedrun.py --quick: both arms train on the same windows and the report adds up."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[1] / "bench" / "cpu_speedrun.py"


def _load():
    spec = importlib.util.spec_from_file_location("cpu_speedrun", BENCH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["cpu_speedrun"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_quick_speedrun_writes_json_and_plot(data_cache: Path, tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    try:
        out = _load().main(["--quick", "--best", "model.qk_norm=true",
                            "--set", f"data.cache_dir={data_cache}",
                            "--json", str(tmp_path / "r.json"), "--plot", str(tmp_path / "r.png")])  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    rows = {r["arm"]: r for r in out["rows"]}
    assert set(rows) == {"ours", "nanogpt", "best"}
    # The target defaults to the nanoGPT arm's final loss, which that arm reaches at its end.
    ref = rows["nanogpt"]
    assert out["target"] == ref["final_val_loss"] == ref["curve"][-1]["val_loss"]
    assert ref["ratio_to_nanogpt"] == 1.0
    assert ref["cpu_s_to_target"] <= ref["curve"][-1]["cpu"]
    for r in rows.values():
        assert [p["step"] for p in r["curve"]] == [0, 1, 2, 3]
        assert all(math.isfinite(p["val_loss"]) for p in r["curve"])
        assert r["curve"][-1]["tokens"] == 3 * 2 * 32  # 3 steps x 2 rows x 32 tokens, every arm
        assert r["tokens_per_s_wall"] > 0 and r["tokens_per_s_cpu"] > 0
    # Same initial evaluation windows, different models: the starting losses are near ln(V).
    for r in rows.values():
        assert abs(r["curve"][0]["val_loss"] - math.log(512)) < 1.0
    assert json.loads((tmp_path / "r.json").read_text())["target"] == out["target"]
    assert (tmp_path / "r.png").stat().st_size > 0


def test_time_to_target_interpolates_between_evaluations() -> None:
    curve = [
        dict(cpu=0.0, val_loss=5.0),
        dict(cpu=10.0, val_loss=4.0),
        dict(cpu=20.0, val_loss=3.0),
    ]
    time_to = _load().time_to
    assert time_to(curve, 3.5, "cpu") == 15.0
    assert time_to(curve, 5.5, "cpu") == 0.0
    assert time_to(curve, 2.0, "cpu") is None
