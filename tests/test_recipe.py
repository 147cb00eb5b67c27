"""`crucible recipe`: validation before any work, a tiny recipe end to end, reruns skip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from crucible.cli import main
from crucible.config import load_config
from crucible.train.trainer import train

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "posttrain" / "recipe-tiny.yaml"


@pytest.fixture(scope="module")
def base_run(small_base, tmp_path_factory) -> Path:
    """A 2-layer base model trained for 4 steps."""
    out = tmp_path_factory.mktemp("recipe-base")
    cfg = load_config("tiny", [*small_base, "name=base", f"out_dir={out}", "train.steps=4",
                               "train.val_every=0", "checkpoint.every=4"])  # fmt: skip
    train(cfg, quiet=True)
    return cfg.run_dir


def _pairs(path: Path) -> Path:
    """Hand-written preference pairs: the tiny models here answer no arithmetic correctly, so
    pref-data finds no pair; the APO stages read these."""
    recs = [
        {"prompt": [{"role": "user", "content": f"What is {a} + {b}?"}],
         "chosen": [{"role": "assistant", "content": f"The answer is {a + b}."}],
         "rejected": [{"role": "assistant", "content": f"The answer is {a + b + 1}."}],
         "chat_template_kwargs": {"enable_thinking": False, "today_date": "01 January 2026"}}
        for a, b in [(1, 2), (3, 4), (5, 6), (7, 8)]
    ]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def recipe_doc(base: Path, small_base: list[str], out: Path, pairs: Path) -> dict:
    """The shipped recipe's shape (mid -> SFT -> pref-data -> APO x 2 -> merge) on a tiny model."""
    small = [o for o in small_base if not o.startswith(("train.", "model."))]
    chat_src = "chat:${chat}/train.jsonl"
    apo = ["train.steps=2", "train.global_batch_size=2", "train.micro_batch_size=2",
           "train.seq_len=256", "train.val_every=0", "checkpoint.every=0", "optim.lr=1e-4",
           "dpo.loss_type=apo_zero"]  # fmt: skip
    return {
        "name": "tiny",
        "out_dir": str(out),
        "base": str(base),
        "threads": 1,
        "stages": [
            {"name": "chat", "kind": "chat-data", "train": 40, "test": 8,
             "tasks": "arithmetic,tool_call"},
            {"name": "mid", "kind": "train", "input": "base", "config": "tiny",
             "overrides": [*small_base, "train.steps=6", "train.val_every=0",
                           f"data.sources={{code: 'stdlib:code', chat: '{chat_src}'}}",
                           "data.stages=[{name: mid, weights: {code: 0.5, chat: 0.5}}]"]},
            {"name": "sft", "kind": "sft", "input": "mid", "config": "sft-tiny",
             "overrides": [*small, "train.steps=2", "train.seq_len=256", "model.max_seq_len=256",
                           "train.global_batch_size=2", "train.micro_batch_size=2",
                           "train.val_every=0", "checkpoint.every=0",
                           "sft.train_data=[${chat}/train.jsonl]"]},
            {"name": "pairs", "kind": "pref-data", "input": "sft", "n": 2, "samples": 2,
             "max_new_tokens": 4},
            {"name": "apo-s0", "kind": "dpo", "input": "sft", "config": "apo.yaml",
             "data": str(pairs), "overrides": [*apo, "seed=0"]},
            {"name": "apo-s1", "kind": "dpo", "input": "sft", "config": "apo.yaml",
             "data": str(pairs), "overrides": [*apo, "seed=1"]},
            {"name": "merged", "kind": "merge", "merges": [
                {"name": "soup", "merge_method": "model_soup",
                 "models": [{"model": "apo-s0"}, {"model": "apo-s1"}]},
                {"name": "merged", "merge_method": "linear",
                 "models": [{"model": "soup", "parameters": {"weight": 0.9}},
                            {"model": "mid", "parameters": {"weight": 0.1}}]}]},
        ],
        "eval": {"chat_data": "${chat}/test.jsonl", "limit": 3, "max_new_tokens": 6,
                 "tasks": "stdlib_bpb", "task_limit": 2},
    }  # fmt: skip


def _write(tmp: Path, doc: dict) -> Path:
    (tmp / "apo.yaml").write_text("name: apo\ndpo: {loss_type: apo_zero, beta: 0.1}\n")
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _run(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as e:
        main(argv)
    return e.value.code


@pytest.mark.parametrize(
    "change, expected",
    [
        (lambda d: d["stages"][1].update(kind="pretrain"),
         "stage 'mid': kind: unknown stage kind 'pretrain'"),
        (lambda d: d["stages"][2].update(input="nope"),
         "stage 'sft' (sft): input: 'nope' is neither base nor an earlier stage"),
        (lambda d: d["stages"][2].update(input="apo-s0"),  # produced later, not earlier
         "stage 'sft' (sft): input: 'apo-s0' is neither base nor an earlier stage"),
        (lambda d: d["stages"][3].update(samples=0),
         "stage 'pairs' (pref-data): samples: Input should be greater than or equal to 1"),
        (lambda d: d["stages"][3].update(sampels=3), "stage 'pairs' (pref-data): sampels: unknown"),
        (lambda d: d["stages"][2]["overrides"].append("train.stepz=3"),
         "stage 'sft' (sft): "),
        (lambda d: d["stages"][1]["overrides"].append("train.steps=4"),  # base is at step 4
         "stage 'mid' (train): overrides: train.steps 4 is not after the input's checkpoint"),
        (lambda d: d["stages"][4].update(config="sft-tiny"),
         "stage 'apo-s0' (dpo): config: sft-tiny is not a dpo config"),
        (lambda d: d["stages"][4]["overrides"].append("dpo.init_from=x"),
         "stage 'apo-s0' (dpo): overrides[9]: dpo.init_from is set by the recipe"),
        (lambda d: d["stages"][6]["merges"][1]["models"][1].update(model="chat"),
         "stage 'merged' (merge): merges[1].models[1].model: 'chat' is a chat-data stage"),
        (lambda d: d["stages"][6]["merges"][0].update(merge_method="average"),
         "stage 'merged' (merge): merges (document 1): merge_method"),
        (lambda d: d["eval"].update(tasks="nosuchtask"), "eval.tasks: --tasks: unknown task"),
        (lambda d: d.update(base="/nonexistent/run"), "base: /nonexistent/run: not a run"),
    ],
)  # fmt: skip
def test_bad_recipe_is_one_line_naming_stage_and_field(
    change, expected, base_run, small_base, tmp_path, capsys
):
    out = tmp_path / "out"
    doc = recipe_doc(base_run, small_base, out, _pairs(tmp_path / "pairs.jsonl"))
    change(doc)
    code = _run(["recipe", str(_write(tmp_path, doc))])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("crucible recipe: error: ") and expected in err, err
    assert not out.exists()  # nothing ran


def test_shipped_recipe_validates(tmp_path, base_run, monkeypatch, capsys):
    """examples/posttrain/recipe-tiny.yaml parses and its stages' configs validate (dry run)."""
    from crucible.posttrain.recipe_config import read_recipe

    recipe, stages = read_recipe(EXAMPLE)
    assert [s.kind for s in stages] == [
        "chat-data", "train", "sft", "pref-data", "dpo", "dpo", "merge"
    ]  # fmt: skip
    assert all(s.kind != "dpo" or "apo" in s.config for s in stages)
    # The tiny base here is at step 4 and has the tiny preset's shape: a dry run validates all.
    doc = yaml.safe_load(EXAMPLE.read_text())
    doc["base"] = str(base_run)
    doc["out_dir"] = str(tmp_path / "out")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(doc))
    (tmp_path / "apo-tiny.yaml").write_text((EXAMPLE.parent / "apo-tiny.yaml").read_text())
    monkeypatch.chdir(tmp_path)
    assert _run(["recipe", str(path), "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any("crucible dpo" in x and "dpo.init_from=" in x for x in lines)
    assert not (tmp_path / "out").exists()


def test_tiny_recipe_end_to_end_then_rerun_skips(base_run, small_base, tmp_path, capsys):
    out = tmp_path / "out"
    path = _write(tmp_path, recipe_doc(base_run, small_base, out, _pairs(tmp_path / "p.jsonl")))
    assert _run(["recipe", str(path)]) == 0
    log = capsys.readouterr().out
    for name in ("mid", "sft", "apo-s0", "apo-s1"):
        assert (out / name / "summary.json").is_file(), name
    assert (out / "merged" / "merge.yaml").is_file()
    assert (out / "chat" / "test.jsonl").is_file() and (out / "pairs" / "pairs.jsonl").is_file()
    # each stage started from the previous one's run directory
    mid_cfg = yaml.safe_load((out / "mid" / "config.yaml").read_text())
    assert mid_cfg["checkpoint"]["init_from"] == str(base_run / "checkpoints" / "step_000004")
    assert (out / "mid" / "tokenizer.json").read_bytes() == (
        base_run / "tokenizer.json"
    ).read_bytes()
    assert yaml.safe_load((out / "sft" / "config.yaml").read_text())["sft"]["base"] == str(
        out / "mid"
    )
    apo_cfg = yaml.safe_load((out / "apo-s0" / "config.yaml").read_text())
    assert apo_cfg["dpo"]["init_from"] == str(out / "sft")
    assert apo_cfg["dpo"]["loss_type"] == "apo_zero" and apo_cfg["seed"] == 0

    # the merge is 0.9 x mean(APO seeds) + 0.1 x mid-training, computed here by hand
    def weights(run: str) -> dict:
        ckpts = sorted((out / run / "checkpoints").iterdir())
        return load_file(ckpts[-1] / "model.safetensors")

    a, b, mid, merged = (weights(r) for r in ("apo-s0", "apo-s1", "mid", "merged"))
    for k, v in merged.items():
        want = 0.9 * (a[k].double() + b[k].double()) / 2 + 0.1 * mid[k].double()
        torch.testing.assert_close(v.double(), want.to(v.dtype).double(), rtol=1e-6, atol=1e-6)
    # the report: one column per evaluated model, the plot, the JSON
    data = json.loads((out / "stages.json").read_text())
    names = ["base", "mid", "sft", "apo-s0", "apo-s1", "merged"]
    assert [r["stage"] for r in data["evaluated"]] == names
    assert all(r["chat"]["ends_with_eot"]["n"] == 3 for r in data["evaluated"])
    assert all(r["tasks"]["stdlib_bpb"]["score"] > 0 for r in data["evaluated"])
    report = (out / "report.md").read_text()
    header = next(x for x in report.splitlines() if x.startswith("| measure"))
    assert all(f"| {n} (" in header for n in names)
    assert "| stdlib_bpb (bpb) |" in report and "stages.png" in report
    assert (out / "stages.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "== stage apo-s1 (dpo): done in" in log

    # a rerun does nothing but the report
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert _run(["recipe", str(path)]) == 0
    log = capsys.readouterr().out
    assert log.count("done, skipped") == 7 + 12  # 7 stages, 6 models x 2 evaluations
    after = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    changed = {p.name for p in before if before[p] != after[p]}
    assert changed <= {"stages.json", "report.md", "stages.png", "recipe.yaml"}

    # an interrupted merge (marker says started) is redone, and so are the evaluations of it
    # (and a training stage stopped after its summary.json, before its marker, is not rerun)
    for name in ("merged", "apo-s1"):
        marker = out / ".recipe" / f"{name}.json"
        marker.write_text(json.dumps({**json.loads(marker.read_text()), "status": "started"}))
    assert _run(["recipe", str(path)]) == 0
    log = capsys.readouterr().out
    assert "== stage apo-s1 (dpo): finished before the interruption" in log
    assert "== stage merged (merge): done in" in log and "== stage sft (sft): done," in log
    assert "== eval merged (chat): done in" in log and "== eval sft (chat): done," in log


def test_changed_stage_needs_force(base_run, small_base, tmp_path, capsys):
    """A done stage whose command changed is an error (not silently stale) until --force."""
    out = tmp_path / "out"
    doc = recipe_doc(base_run, small_base, out, _pairs(tmp_path / "p.jsonl"))
    doc["stages"] = doc["stages"][:1]
    doc.pop("eval")
    path = _write(tmp_path, doc)
    assert _run(["recipe", str(path)]) == 0
    doc["stages"][0]["train"] = 41
    path.write_text(yaml.safe_dump(doc))
    assert _run(["recipe", str(path)]) == 2
    assert "stage 'chat': done with another command" in capsys.readouterr().err
    assert _run(["recipe", str(path), "--force"]) == 0
    assert len((out / "chat" / "train.jsonl").read_text().splitlines()) == 41


def test_interrupted_training_stage_resumes(base_run, small_base, tmp_path, capsys, monkeypatch):
    """A stage stopped after a checkpoint continues from it (--resume) on the next run."""
    import crucible.posttrain.recipe as recipe_mod

    out = tmp_path / "out"
    doc = recipe_doc(base_run, small_base, out, _pairs(tmp_path / "p.jsonl"))
    sft = doc["stages"][2]
    sft.update(input="base")
    sft["overrides"] = [o for o in sft["overrides"] if not o.startswith(("train.steps", "check"))]
    sft["overrides"] += ["train.steps=4", "checkpoint.every=2"]
    doc["stages"] = [doc["stages"][0], sft]
    doc.pop("eval")
    path = _write(tmp_path, doc)
    real_call = recipe_mod.call

    def interrupted(argv):  # the SFT stops after its step-2 checkpoint, like a killed run
        if argv[0] == "sft":
            real_call([*argv, "train.stop_at=2"])
            raise KeyboardInterrupt
        return real_call(argv)

    monkeypatch.setattr(recipe_mod, "call", interrupted)
    assert _run(["recipe", str(path)]) == 130
    assert json.loads((out / ".recipe" / "sft.json").read_text())["status"] == "started"
    assert not (out / "sft" / "summary.json").exists()
    monkeypatch.setattr(recipe_mod, "call", real_call)
    assert _run(["recipe", str(path)]) == 0
    log = capsys.readouterr().out
    assert "== stage chat (chat-data): done, skipped" in log
    assert "== stage sft (sft) (resumed): crucible sft" in log and " --resume" in log
    assert json.loads((out / "sft" / "summary.json").read_text())["step"] == 4
    events = [json.loads(x) for x in (out / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert any(e["event"] == "resume" for e in events)
